//! The jail (`--jail`): a VMM that runs as an unprivileged user with no capabilities, in its
//! own namespaces, seeing only its VM's files; its keeper passes signals on and cleans up.
//! And vCPU pinning (`--cpu-affinity`).
//!
//! The jail needs root to set up: these tests fail (never pass silently) without it.

mod common;

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::soak::Console;
use common::*;

/// A directory the jail's user owns.
fn owned_dir(tmp: &TempDir, name: &str, uid: u32) -> PathBuf {
    let d = tmp.file(name);
    std::fs::create_dir_all(&d).unwrap();
    chown(&d, Some(uid), Some(uid)).unwrap();
    d
}

/// The keeper's only child: the jailed VMM, once it exists.
fn vmm_pid(keeper: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap();
        if let Some(p) = children.split_whitespace().next() {
            return p.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "the keeper has no child");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `Field:` of /proc/PID/status, its values split.
fn status(pid: u32, field: &str) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// Runs `vessel ARGS` through a shell that sends its stderr to `err`.
fn spawn_logged(args: &[&str], env: &str, err: &Path) -> Console {
    let cmd = format!("{env} exec {VESSEL} {} 2>{}", args.join(" "), err.display());
    Console::spawn_command(&["sh", "-c", &cmd])
}

#[test]
fn a_jailed_vm_runs_unprivileged_in_its_namespaces_and_sees_only_its_files() {
    require_root();
    const UID: u32 = 42_001;
    let tmp = TempDir::new("jail-vm");
    let vm_dir = owned_dir(&tmp, "vm", UID);
    let disk = vm_dir.join("disk.raw");
    raw_disk(&disk, 16 << 20);
    chown(&disk, Some(UID), Some(UID)).unwrap();
    let api = vm_dir.join("api.sock");
    let snaps = owned_dir(&tmp, "snapshots", UID);
    // A host file outside the jail, readable by everyone.
    let secret = tmp.file("outside/secret");
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    std::fs::write(&secret, "host data").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = tmp.file("stderr");
    let disk_spec = format!("path={}", disk.display());
    let jail = format!("uid={UID},gid={UID}");
    let mut vm = spawn_logged(
        &[
            "run",
            "--disk",
            &disk_spec,
            "--api-socket",
            api.to_str().unwrap(),
            "--jail",
            &jail,
            "--jail-path",
            snaps.to_str().unwrap(),
            "--cmdline",
            "'action=soak soakms=50'",
        ],
        &format!("VESSEL_TEST_JAIL_OPEN={}", secret.display()),
        &err,
    );
    vm.soak_lines(1, 2);
    // The guest wrote, read and flushed its disk through the jail.
    assert!(vm.seen.contains("write/read/flush ok"), "{}", vm.seen);
    let keeper = vm.child.id();
    let pid = vmm_pid(keeper);
    assert_eq!(status(pid, "Uid"), vec![UID.to_string(); 4]);
    assert_eq!(status(pid, "Gid"), vec![UID.to_string(); 4]);
    assert_eq!(status(pid, "Groups"), Vec::<String>::new());
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status(pid, caps), ["0000000000000000"], "{caps}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), ["1"]);
    assert_eq!(status(pid, "Seccomp"), ["2"]);
    // PID 1 of its own PID namespace; its own mount, IPC and UTS namespaces.
    assert_eq!(status(pid, "NSpid"), [pid.to_string(), "1".into()]);
    for kind in ["mnt", "pid", "ipc", "uts"] {
        let (ours, its) = (ns("self", kind), ns(&pid.to_string(), kind));
        assert_ne!(ours, its, "{kind}");
    }
    // The network namespace stays the host's unless asked.
    assert_eq!(ns("self", "net"), ns(&pid.to_string(), "net"));
    // A VMM (made to behave like a compromised one by the test hook) cannot open a host file
    // outside its jail.
    let log = std::fs::read_to_string(&err).unwrap();
    assert!(
        log.contains(&format!(
            "jailed VMM cannot open {}: No such file or directory",
            secret.display()
        )),
        "{log}"
    );
    // The API cannot make it write outside either; the VM runs on.
    let outside = tmp.file("outside/snap");
    let o = ctl(&api, &["snapshot", "--dir", outside.to_str().unwrap()]);
    assert_code(&o, 1);
    assert!(!outside.exists());
    let inside = snaps.join("s1");
    assert_code(
        &ctl(&api, &["snapshot", "--dir", inside.to_str().unwrap()]),
        0,
    );
    assert!(inside.join("memory").exists() || std::fs::read_dir(&inside).unwrap().count() > 1);
    vm.soak_lines(1, 1);
    // SIGTERM to the keeper reaches the VMM, which ends as an unjailed one would.
    assert_eq!(vm.stop(), Some(143));
    assert!(
        !Path::new(&format!("/run/vessel/jail/{keeper}")).exists(),
        "the jail's directory is left behind"
    );
    assert!(!api.exists(), "the API socket is left behind");
    // The snapshot restores in a jail too, its memory through a userfaultfd the jail's user
    // may create (/dev/userfaultfd in the jail).
    let mut restored = Console::spawn(&[
        "run",
        "--restore",
        inside.to_str().unwrap(),
        "--restore-memory",
        "uffd",
        "--api-socket",
        api.to_str().unwrap(),
        "--jail",
        &jail,
    ]);
    restored.soak_lines(1, 2);
    assert_eq!(
        status(vmm_pid(restored.child.id()), "Uid")[0],
        UID.to_string()
    );
    assert_eq!(restored.stop(), Some(143));
}

#[test]
fn a_jail_refuses_what_it_cannot_give_with_a_clear_error() {
    require_root();
    let tmp = TempDir::new("jail-refuse");
    let disk = tmp.file("root-only.raw");
    raw_disk(&disk, 1 << 20);
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let disk_spec = format!("path={}", disk.display());
    for (args, code, says) in [
        (
            vec!["run", "--jail", "uid=0,gid=0"],
            2,
            "uid and gid must not be 0",
        ),
        (
            vec!["run", "--jail", "gid=5"],
            2,
            "uid=N and gid=N are required",
        ),
        (
            vec!["run", "--jail", "uid=5,gid=5,memory-max=lots"],
            2,
            "memory-max",
        ),
        (
            vec!["run", "--disk", &disk_spec, "--jail", "uid=42002,gid=42002"],
            2,
            "uid 42002 gid 42002 cannot read and write",
        ),
        (vec!["run", "--jail-path", "/srv"], 2, "--jail"),
        (vec!["run", "--cpu-affinity", "100000"], 2, "--cpu-affinity"),
        (
            vec!["run", "--cpus", "2", "--cpu-affinity", "2=0"],
            2,
            "vCPU 2",
        ),
    ] {
        let o = vessel(&args);
        assert_code(&o, code);
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

/// The cgroup v2 hierarchy's directory and the controllers its root offers.
fn cgroup2() -> Option<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap()))
    })?;
    let offered = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
    Some((dir, offered))
}

#[test]
fn a_jailed_vm_runs_in_a_cgroup_with_its_limits_or_is_refused_where_the_host_cannot() {
    require_root();
    let Some((root, offered)) = cgroup2() else {
        panic!("no cgroup v2 hierarchy on this host");
    };
    let name = format!("vessel-test/{}", std::process::id());
    let jail = format!("uid=42003,gid=42003,cgroup={name},memory-max=512M,cpu-max=50%,pids-max=64");
    let have = |c: &str| offered.split_whitespace().any(|o| o == c);
    if !(have("memory") && have("cpu") && have("pids")) {
        // Controllers bound to cgroup v1 (this development host): a clear refusal, exit 1,
        // and nothing left behind.
        let o = vessel(&["run", "--jail", &jail]);
        assert_code(&o, 1);
        assert!(stderr(&o).contains("is not available in"), "{}", stderr(&o));
        assert!(!root.join(&name).exists());
        return;
    }
    let mut vm = Console::spawn(&["run", "--jail", &jail, "--cmdline", "action=soak soakms=50"]);
    vm.soak_lines(1, 1);
    let pid = vmm_pid(vm.child.id());
    let cg = root.join(&name);
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), pid.to_string());
    let read = |f: &str| {
        std::fs::read_to_string(cg.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read("memory.max"), (512u64 << 20).to_string());
    assert_eq!(read("cpu.max"), "50000 100000");
    assert_eq!(read("pids.max"), "64");
    assert_eq!(vm.stop(), Some(143));
    assert!(!cg.exists(), "the cgroup is left behind");
}

#[test]
fn a_jailed_vm_gets_a_tap_made_for_its_user_and_removed_after() {
    require_root();
    const UID: u32 = 42_004;
    let tap = format!("vj{}", std::process::id() % 100_000);
    let net = format!("tap={tap}");
    let start = |extra: &str| {
        let jail = format!("uid={UID},gid={UID}{extra}");
        let mut vm = Console::spawn(&[
            "run",
            "--net",
            &net,
            "--jail",
            &jail,
            "--cmdline",
            "action=soak soakms=50",
        ]);
        vm.soak_lines(1, 1);
        vm
    };
    let mut vm = start("");
    let owner = std::fs::read_to_string(format!("/sys/class/net/{tap}/owner")).unwrap();
    assert_eq!(owner.trim(), UID.to_string());
    assert_eq!(vm.stop(), Some(143));
    assert!(
        !Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "the tap is left behind"
    );
    // In a new network namespace the tap is the VM's alone: not in the host's.
    let mut vm = start(",netns=new");
    let pid = vmm_pid(vm.child.id());
    assert_ne!(ns("self", "net"), ns(&pid.to_string(), "net"));
    assert!(!Path::new(&format!("/sys/class/net/{tap}")).exists());
    assert_eq!(vm.stop(), Some(143));
}

#[test]
fn a_jailed_vm_connects_to_its_stream_socket_and_runs_passt_as_its_user() {
    require_root();
    const UID: u32 = 42_008;
    let tmp = TempDir::new("jail-stream");
    let dir = owned_dir(&tmp, "sockets", UID);
    let sock = dir.join("net.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // The jail's user must be able to connect: refused, saying so, before anything starts.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o755)).unwrap();
    let net = format!("socket={}", sock.display());
    let jail = format!("uid={UID},gid={UID}");
    let o = vessel(&["run", "--jail", &jail, "--net", &net]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains(&format!("cannot connect to {}", sock.display())),
        "{}",
        stderr(&o)
    );
    // Its own socket: bound into the jail at its path, the guest's frames arrive.
    chown(&sock, Some(UID), Some(UID)).unwrap();
    let peer = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        all.len()
    });
    let o = vessel(&["run", "--jail", &jail, "--net", &net]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains(": sent 2,"), "{}", stdout(&o));
    // An ARP request and a UDP broadcast, each with its length.
    assert!(peer.join().unwrap() >= 2 * (4 + 60));

    // passt, started by Vessel outside the jail as the jail's user, its socket in the jail.
    let tmpdir = owned_dir(&tmp, "tmp", UID);
    let err = tmp.file("stderr");
    let mut vm = spawn_logged(
        &[
            "run",
            "--jail",
            &format!("{jail},netns=new"),
            "--net",
            "passt",
            "--cmdline",
            "'action=soak soakms=50'",
        ],
        &format!("TMPDIR={}", tmpdir.display()),
        &err,
    );
    vm.soak_lines(1, 1);
    let keeper = vm.child.id();
    let children: Vec<u32> =
        std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children"))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
    let passt = children
        .iter()
        .copied()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("--one-off"))
        })
        .unwrap_or_else(|| panic!("no passt among the keeper's children {children:?}"));
    assert_eq!(status(passt, "Uid")[1], UID.to_string());
    let dirs = || std::fs::read_dir(&tmpdir).unwrap().count();
    assert_eq!(dirs(), 1, "passt's private directory");
    assert_eq!(vm.stop(), Some(143));
    assert_eq!(dirs(), 0, "passt's directory is left behind");
    let gone = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(passt) {
        assert!(Instant::now() < deadline, "passt outlives the VM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The host CPUs thread `name` of process `pid` may run on.
fn thread_cpus(pid: u32, name: &str) -> String {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        if std::fs::read_to_string(t.join("comm")).unwrap().trim() == name {
            let s = std::fs::read_to_string(t.join("status")).unwrap();
            return s
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
        }
    }
    panic!("no thread {name} in process {pid}");
}

#[test]
fn vcpu_threads_are_pinned_as_asked() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = (cpus - 1).to_string();
    let one = format!("1={last}");
    let mut vm = Console::spawn(&[
        "run",
        "--cpus",
        "2",
        "--cpu-affinity",
        "0",
        "--cpu-affinity",
        &one,
        "--cmdline",
        "action=soak soakms=50",
    ]);
    vm.soak_lines(2, 1);
    let pid = vm.child.id();
    assert_eq!(thread_cpus(pid, "vcpu0"), "0");
    assert_eq!(thread_cpus(pid, "vcpu1"), last);
    assert_eq!(vm.stop(), Some(143));
}

#[test]
fn a_jailed_vm_stopped_as_it_starts_still_stops() {
    require_root();
    // SIGTERM at once: the VMM (PID 1 of its namespace) has no handler yet, and would drop
    // it if it were not held blocked until the handlers are in.
    for _ in 0..3 {
        let mut vm = Command::new(VESSEL)
            .args([
                "run",
                "--jail",
                "uid=42005,gid=42005",
                "--cmdline",
                "action=soak soakms=50",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let keeper = vm.id();
        vmm_pid(keeper);
        let _ = Command::new("kill")
            .args(["-TERM", &keeper.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = vm.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = vm.kill();
                panic!("the SIGTERM was lost: the jailed VM runs on");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(143));
    }
}

#[test]
fn a_jailed_vm_migrates_to_a_jailed_target() {
    require_root();
    const UID: u32 = 42_006;
    let tmp = TempDir::new("jail-migrate");
    let dir = owned_dir(&tmp, "vm", UID);
    let disk = dir.join("disk.raw");
    raw_disk(&disk, 16 << 20);
    chown(&disk, Some(UID), Some(UID)).unwrap();
    let (src_api, dst_api) = (dir.join("src.sock"), dir.join("dst.sock"));
    let jail = format!("uid={UID},gid={UID}");
    let disk_spec = format!("path={}", disk.display());
    let mut source = Console::spawn(&[
        "run",
        "--disk",
        &disk_spec,
        "--api-socket",
        src_api.to_str().unwrap(),
        "--jail",
        &jail,
        "--cmdline",
        "action=soak soakms=50 soakdisk=on virtio=blk",
    ]);
    // The target sees the VM's directory (its disk, the sockets), nothing else.
    let mut target = Console::spawn(&[
        "serve",
        "--api-socket",
        dst_api.to_str().unwrap(),
        "--jail",
        &jail,
        "--jail-path",
        dir.to_str().unwrap(),
    ]);
    wait_for(&src_api);
    wait_for(&dst_api);
    source.soak_lines(1, 1);
    let addr = format!("unix:{}", dir.join("mig.sock").display());
    let o = ctl(
        &dst_api,
        &[
            "migrate",
            "receive",
            "--listen",
            &addr,
            "--disk",
            disk.to_str().unwrap(),
        ],
    );
    assert_code(&o, 0);
    let token = common::migration::printed_token(&o);
    let o = ctl(
        &src_api,
        &["migrate", "send", "--to", &addr, "--token", &token],
    );
    assert_code(&o, 0);
    assert_eq!(source.child.wait().unwrap().code(), Some(0));
    target.soak_lines(1, 2);
    let pid = vmm_pid(target.child.id());
    assert_eq!(status(pid, "Uid"), vec![UID.to_string(); 4]);
    assert_eq!(target.stop(), Some(143));
}

#[test]
fn a_jailed_vm_dies_with_its_keeper() {
    require_root();
    // The parent-death signal is cleared when the VMM changes its credentials: it must be set
    // again after the drop, or a killed keeper leaves an orphan VM running.
    let mut vm = Console::spawn(&[
        "run",
        "--jail",
        "uid=42007,gid=42007",
        "--cmdline",
        "action=soak soakms=50",
    ]);
    vm.soak_lines(1, 1);
    let keeper = vm.child.id();
    let pid = vmm_pid(keeper);
    vm.child.kill().unwrap();
    let _ = vm.child.wait();
    // What a killed keeper cannot remove.
    let _ = std::fs::remove_dir(format!("/run/vessel/jail/{keeper}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    // Gone, or a zombie waiting for init.
    while std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
    {
        assert!(Instant::now() < deadline, "the VMM outlived its keeper");
        std::thread::sleep(Duration::from_millis(10));
    }
}
