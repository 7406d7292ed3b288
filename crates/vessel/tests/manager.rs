//! `vessel daemon` on the direct host: VMs made from a template of the bundled guest, kept
//! running by the daemon (restarted by policy when killed from outside), surviving a restart
//! of the daemon, and leaving nothing behind once deleted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use serde_json::Value;

#[test]
fn ten_vms_from_a_template_survive_a_kill_and_a_daemon_restart_then_leave_nothing() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager");
    let base = dir.file("base.raw");
    raw_disk(&base, 4 << 20);
    let d = Daemon::start(&dir.0);
    d.ok(&[
        "template",
        "create",
        "tiny",
        "--cmdline",
        "console=ttyS0 action=idle",
        "--memory",
        "64M",
        "--disk",
        base.to_str().unwrap(),
    ]);
    let names: Vec<String> = (0..10).map(|i| format!("vm{i}")).collect();
    for n in &names {
        d.ok(&["vm", "create", n, "--template", "tiny", "--start"]);
    }
    // All listed, running, each on its own thin overlay.
    let list = d.json(&["vm", "list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 10);
    for v in list {
        assert_eq!(v["state"], "running", "{v}");
        let disk = PathBuf::from(v["disks"][0].as_str().unwrap());
        assert!(disk.starts_with(&d.state), "{}", disk.display());
        assert_eq!(&std::fs::read(&disk).unwrap()[..4], b"QFI\xfb");
    }
    let table = d.ok(&["vm", "list"]);
    assert_eq!(
        table.lines().filter(|l| l.contains(" running ")).count(),
        10,
        "{table}"
    );

    // Killed from outside: restarted by the policy, with events saying so.
    let old = d.vm("vm3")["pid"].as_u64().unwrap();
    Command::new("kill")
        .args(["-KILL", &old.to_string()])
        .status()
        .unwrap();
    wait_until("vm3 restarted", || {
        let v = d.vm("vm3");
        v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p != old)
    });
    let events = d.events();
    assert!(
        events.contains(&"vm.crashed vm3 killed by signal 9".to_string()),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("vm.restarted vm3")),
        "{events:#?}"
    );
    assert_eq!(d.vm("vm3")["restarts"], 1);

    // The daemon restarts: the VMs run on, and it finds every one again.
    let pids: Vec<u64> = names
        .iter()
        .map(|n| d.vm(n)["pid"].as_u64().unwrap())
        .collect();
    let dir_path = dir.0.clone();
    assert_eq!(d.stop(), Some(0));
    for p in &pids {
        assert!(alive(*p), "VM process {p} ended with the daemon");
    }
    let d = Daemon::start(&dir_path);
    for (n, p) in names.iter().zip(&pids) {
        let v = d.vm(n);
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["pid"].as_u64(), Some(*p), "{v}");
    }
    let adopted = d
        .events()
        .iter()
        .filter(|e| e.starts_with("vm.adopted"))
        .count();
    assert_eq!(adopted, 10);

    // Stop them all at once (the idle guest ignores the power button: the timeout ends it).
    std::thread::scope(|s| {
        for n in &names {
            let d = &d;
            s.spawn(move || d.ok(&["vm", "stop", n, "--timeout", "1"]));
        }
    });
    for (n, p) in names.iter().zip(&pids) {
        assert_eq!(d.vm(n)["state"], "stopped");
        assert!(!alive(*p), "{n}'s process {p} still runs");
    }
    // A stopped VM stays stopped (no restart), and comes back with start.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.vm("vm0")["state"], "stopped");
    d.ok(&["vm", "start", "vm0"]);
    assert_eq!(d.vm("vm0")["state"], "running");
    let o = d.vessel(&["vm", "delete", "vm0"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("vm0 is running"), "{}", stderr(&o));
    d.ok(&["vm", "kill", "vm0"]);

    // Deleted: no process, socket, overlay or record left.
    let o = d.vessel(&["template", "delete", "tiny"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("is the base of"), "{}", stderr(&o));
    for n in &names {
        d.ok(&["vm", "delete", n]);
    }
    d.ok(&["template", "delete", "tiny"]);
    assert_eq!(d.json(&["vm", "list"]), serde_json::json!([]));
    let (state, run) = (d.state.clone(), d.run.clone());
    assert_eq!(d.stop(), Some(0));
    let marker = state.display().to_string();
    assert_eq!(processes_with(&marker), Vec::<String>::new());
    assert_eq!(std::fs::read_dir(state.join("vms")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(run.join("vms")).unwrap().count(), 0);
    assert!(!run.join("vessel.sock").exists());
    use manager::store::Store;
    let db = manager::store::SqliteStore::open(&state.join("vessel.db")).unwrap();
    assert!(db.vms().unwrap().is_empty());
    assert!(db.templates().unwrap().is_empty());
    assert!(base.exists(), "the template's base stays");
}

#[test]
fn bad_requests_are_refused_clearly() {
    let dir = TempDir::new("manager-bad");
    let d = Daemon::start(&dir.0);
    let refused = |args: &[&str], code: i32, want: &str| {
        let o = d.vessel(args);
        assert_code(&o, code);
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    };
    refused(
        &["vm", "create", "a", "-t", "nope"],
        1,
        "no template named nope",
    );
    refused(&["template", "create", "../x"], 2, "is not a name");
    refused(
        &["template", "create", "t", "--disk", "/nonexistent.raw"],
        2,
        "base_disks[0]",
    );
    refused(&["template", "create", "t", "--cpus", "0"], 2, "spec.cpus");
    d.ok(&["template", "create", "t"]);
    refused(&["template", "create", "t"], 1, "exists already");
    refused(&["vm", "start", "ghost"], 1, "no VM named ghost");
    d.ok(&["vm", "create", "a", "-t", "t"]);
    refused(&["vm", "create", "a", "-t", "t"], 1, "exists already");
    // A VM that cannot start (no such kernel): the error says why, the VM stays stopped.
    let spec = dir.file("spec.json");
    std::fs::write(&spec, r#"{"boot": {"kernel": "/nonexistent/vmlinuz"}}"#).unwrap();
    d.ok(&[
        "template",
        "create",
        "broken",
        "--spec",
        spec.to_str().unwrap(),
    ]);
    d.ok(&["vm", "create", "b", "-t", "broken"]);
    refused(&["vm", "start", "b"], 1, "/nonexistent/vmlinuz");
    assert_eq!(d.vm("b")["state"], "stopped");
    let o = d.vessel(&["vm", "list"]);
    assert_code(&o, 0);
}

/// The OpenAPI document is made with the router: every route it names answers (never the
/// fallback's "no such route" or a wrong method), and it names them all.
#[test]
fn the_openapi_document_is_the_api() {
    let dir = TempDir::new("manager-openapi");
    let d = Daemon::start(&dir.0);
    let c = manager::client::Client::new(&d.socket);
    let doc: Value = c.get("/api/v1/openapi.json").unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    let mut ops = Vec::new();
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            ops.push(format!("{} {path}", method.to_uppercase()));
            let url = path
                .replace("{name}", "ghost")
                .replace("{snapshot}", "s")
                .replace("{pool}", "ghost")
                .replace("{volume}", "v")
                .replace("{network}", "ghost");
            let body = (method != "get").then(|| serde_json::json!({"name": "ghost"}));
            if path.ends_with("/stream") {
                continue; // never ends; the events route has the same handler's data
            }
            match c.call(&method.to_uppercase(), &url, body.as_ref()) {
                Ok(_) => {}
                Err(manager::client::ClientError::Api { status, message }) => {
                    assert!(
                        status != 405 && !message.contains("no such route"),
                        "{method} {url}: {status} {message}"
                    );
                }
                Err(e) => panic!("{method} {url}: {e}"),
            }
        }
    }
    ops.sort();
    let want = [
        "DELETE /api/v1/networks/{network}",
        "DELETE /api/v1/pools/{pool}",
        "DELETE /api/v1/pools/{pool}/volumes/{volume}",
        "DELETE /api/v1/templates/{name}",
        "DELETE /api/v1/tokens/{name}",
        "DELETE /api/v1/vms/{name}",
        "DELETE /api/v1/vms/{name}/snapshots/{snapshot}",
        "GET /api/v1/events",
        "GET /api/v1/events/stream",
        "GET /api/v1/metrics",
        "GET /api/v1/networks",
        "GET /api/v1/networks/{network}",
        "GET /api/v1/ping",
        "GET /api/v1/pools",
        "GET /api/v1/pools/{pool}",
        "GET /api/v1/pools/{pool}/volumes",
        "GET /api/v1/pools/{pool}/volumes/{volume}",
        "GET /api/v1/templates",
        "GET /api/v1/templates/{name}",
        "GET /api/v1/tokens",
        "GET /api/v1/vms",
        "GET /api/v1/vms/{name}",
        "GET /api/v1/vms/{name}/log",
        "GET /api/v1/vms/{name}/snapshots",
        "PATCH /api/v1/vms/{name}",
        "POST /api/v1/migrations/incoming",
        "POST /api/v1/networks",
        "POST /api/v1/pools",
        "POST /api/v1/pools/{pool}/volumes",
        "POST /api/v1/templates",
        "POST /api/v1/tokens",
        "POST /api/v1/vms",
        "POST /api/v1/vms/{name}/clone",
        "POST /api/v1/vms/{name}/snapshots",
        "PUT /api/v1/networks/{network}/start",
        "PUT /api/v1/networks/{network}/stop",
        "PUT /api/v1/pools/{pool}/volumes/{volume}/resize",
        "PUT /api/v1/pools/{pool}/volumes/{volume}/upload",
        "PUT /api/v1/suspend-all",
        "PUT /api/v1/vms/{name}/kill",
        "PUT /api/v1/vms/{name}/migrate",
        "PUT /api/v1/vms/{name}/pause",
        "PUT /api/v1/vms/{name}/restart",
        "PUT /api/v1/vms/{name}/resume",
        "PUT /api/v1/vms/{name}/snapshots/{snapshot}/restore",
        "PUT /api/v1/vms/{name}/start",
        "PUT /api/v1/vms/{name}/stop",
        "PUT /api/v1/vms/{name}/suspend",
    ];
    assert_eq!(ops, want);
    // The schemas are the types': a VM's view names its state and its spec's fields.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in [
        "VmView",
        "VmCreate",
        "TemplateCreate",
        "Template",
        "Event",
        "VmSpec",
    ] {
        assert!(schemas.contains_key(s), "{s} missing");
    }
    // Every reference resolves.
    assert_eq!(api::testing::unresolved_refs(&doc), Vec::<String>::new());
    // An unknown route is the fallback's 404.
    match c.call("GET", "/api/v1/nothing", None) {
        Err(manager::client::ClientError::Api {
            status: 404,
            message,
        }) => {
            assert!(message.contains("no such route"))
        }
        other => panic!("{other:?}"),
    }
}

/// `vessel events --follow` prints each event as it happens.
#[test]
fn events_follow_as_they_happen() {
    let dir = TempDir::new("manager-events");
    let d = Daemon::start(&dir.0);
    d.ok(&["template", "create", "t"]);
    let mut follow = Command::new(VESSEL)
        .args(["events", "--follow", "--json", "--socket"])
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> Value {
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap()
    };
    // The past first: the daemon's default pool, then the template.
    assert_eq!(next()["kind"], "pool.created");
    assert_eq!(next()["kind"], "template.created");
    d.ok(&["vm", "create", "a", "-t", "t"]);
    let e = next();
    assert_eq!(
        (e["kind"].as_str(), e["subject"].as_str()),
        (Some("vm.created"), Some("a"))
    );
    d.ok(&["vm", "delete", "a"]);
    assert_eq!(next()["kind"], "vm.deleted");
    let _ = follow.kill();
    let _ = follow.wait();
}

/// A free TCP port on the loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Over TCP the API is TLS with the daemon's certificate and bearer tokens: none or a wrong
/// one is a 401, a read-only one may look but not start or delete (403), an admin one may.
#[test]
fn tcp_needs_tls_and_a_token_and_read_only_tokens_only_look() {
    let dir = TempDir::new("manager-tcp");
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(&dir.0, &["--listen", &addr]);
    d.ok(&[
        "template",
        "create",
        "t",
        "--cmdline",
        "console=ttyS0 action=idle",
    ]);
    d.ok(&["vm", "create", "a", "-t", "t"]);
    let reader = d.ok(&["token", "create", "reader", "--role", "read-only"]);
    let admin = d.ok(&["token", "create", "boss", "--role", "admin"]);
    let (reader, admin) = (reader.trim(), admin.trim());
    assert!(reader.starts_with("vsl_") && reader.len() == 68, "{reader}");
    let listed = d.ok(&["token", "list"]);
    assert!(
        listed.contains("reader") && listed.contains("read-only"),
        "{listed}"
    );
    assert!(
        !listed.contains(reader),
        "secrets are never listed: {listed}"
    );
    let ca = d.state.join("tls/daemon.crt");
    let remote = |token: Option<&str>, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--remote", &addr, "--tls-ca", ca.to_str().unwrap()]);
        if let Some(t) = token {
            all.extend(["--token", t]);
        }
        vessel(&all)
    };
    // No token, a wrong one: refused.
    for t in [None, Some("vsl_00")] {
        let o = remote(t, &["vm", "list"]);
        assert_code(&o, 1);
        assert!(
            stderr(&o).contains("a valid token is needed"),
            "{}",
            stderr(&o)
        );
    }
    // Read-only: list and info, not start, delete or tokens.
    let o = remote(Some(reader), &["vm", "list"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("a "), "{}", stdout(&o));
    assert_code(&remote(Some(reader), &["vm", "info", "a"]), 0);
    for args in [
        &["vm", "start", "a"][..],
        &["vm", "delete", "a"],
        &["token", "list"],
        &["token", "create", "more", "--role", "admin"],
    ] {
        let o = remote(Some(reader), args);
        assert_code(&o, 1);
        assert!(stderr(&o).contains("read-only"), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(d.vm("a")["state"], "stopped");
    // Admin: everything.
    assert_code(&remote(Some(admin), &["vm", "start", "a"]), 0);
    assert_eq!(d.vm("a")["state"], "running");
    assert_code(&remote(Some(admin), &["vm", "kill", "a"]), 0);
    assert_code(&remote(Some(admin), &["vm", "delete", "a"]), 0);
    // A revoked token stops working; a client that does not trust the certificate is refused.
    d.ok(&["token", "delete", "reader"]);
    assert_code(&remote(Some(reader), &["vm", "list"]), 1);
    let other = dir.file("other.crt");
    std::fs::write(
        &other,
        std::fs::read_to_string(&ca).unwrap().replace("MII", "MIJ"),
    )
    .unwrap();
    let o = vessel(&[
        "vm",
        "list",
        "--remote",
        &addr,
        "--tls-ca",
        other.to_str().unwrap(),
        "--token",
        admin,
    ]);
    assert_code(&o, 1);
    // Plain HTTP on the TLS port gets nothing.
    use std::io::{Read, Write};
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let _ = plain.write_all(b"GET /api/v1/vms HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
}

/// Pause and resume through the daemon (the VM's own API agrees), and the metrics.
#[test]
fn pause_resume_and_metrics() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-pause");
    let d = Daemon::start(&dir.0);
    let base = dir.file("base.raw");
    raw_disk(&base, 4 << 20);
    d.ok(&[
        "template",
        "create",
        "t",
        "--cmdline",
        "console=ttyS0 action=idle",
        "--cpus",
        "2",
        "--disk",
        base.to_str().unwrap(),
    ]);
    d.ok(&["vm", "create", "a", "-t", "t", "--start"]);
    d.ok(&["vm", "create", "b", "-t", "t"]);
    let api = d.vm("a")["api_socket"].as_str().unwrap().to_string();
    let vm_state = || {
        let o = ctl(Path::new(&api), &["--json", "info"]);
        serde_json::from_str::<Value>(&stdout(&o)).unwrap()["state"].clone()
    };
    d.ok(&["vm", "pause", "a"]);
    assert_eq!(d.vm("a")["state"], "paused");
    assert_eq!(vm_state(), "paused");
    d.ok(&["vm", "resume", "a"]);
    assert_eq!(d.vm("a")["state"], "running");
    assert_eq!(vm_state(), "running");
    let o = d.vessel(&["vm", "pause", "b"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("b is not running"), "{}", stderr(&o));
    let c = manager::client::Client::new(&d.socket);
    let m = String::from_utf8(c.call("GET", "/api/v1/metrics", None).unwrap().to_vec()).unwrap();
    for want in [
        "vessel_vms{state=\"running\"} 1",
        "vessel_vms{state=\"stopped\"} 1",
        "vessel_vm_vcpus{vm=\"a\"} 2",
        "vessel_vm_up{vm=\"b\"} 0",
        "vessel_vm_cpu_seconds_total{vm=\"a\"} ",
        "vessel_vm_resident_bytes{vm=\"a\"} ",
        "vessel_daemon_resident_bytes ",
        "vessel_vm_vcpu_exits_total{vm=\"a\",vcpu=\"1\"} ",
        "vessel_vm_net_rx_packets_total ",
    ] {
        assert!(m.contains(want), "{want} not in:\n{m}");
    }
    // Its log: the VMM's own messages.
    let log = d.ok(&["vm", "log", "a", "-n", "5"]);
    assert!(log.contains("guest boot marker"), "{log}");
    assert!(log.lines().count() <= 5);
    // The VM's own counters: the guest writes its disk at boot.
    let value = |text: &str, series: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
    };
    wait_until("the disk's writes in the metrics", || {
        let m =
            String::from_utf8(c.call("GET", "/api/v1/metrics", None).unwrap().to_vec()).unwrap();
        value(
            &m,
            "vessel_vm_disk_write_ops_total{vm=\"a\",disk=\"block0\"}",
        )
        .is_some_and(|n| n > 0)
            && value(
                &m,
                "vessel_vm_disk_write_bytes_total{vm=\"a\",disk=\"block0\"}",
            )
            .is_some_and(|n| n >= 512)
    });
    d.ok(&["vm", "kill", "a"]);
}

/// `--hostname` and `--ssh-key` make a cloud-init NoCloud seed: a read-only FAT disk
/// labelled CIDATA with meta-data and user-data, after the template's disks.
#[test]
fn a_cloud_init_seed_goes_with_the_vm() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-seed");
    let d = Daemon::start(&dir.0);
    d.idle_template_with_disk(&dir, 1 << 20);
    let key = dir.file("id.pub");
    std::fs::write(&key, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA me@laptop\n").unwrap();
    let o = d.vessel(&[
        "vm",
        "create",
        "bad",
        "-t",
        "t",
        "--hostname",
        "no_such host",
    ]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("cloud_init.hostname"), "{}", stderr(&o));
    d.ok(&[
        "vm",
        "create",
        "web1",
        "-t",
        "t",
        "--hostname",
        "web1.example",
        "--ssh-key",
        key.to_str().unwrap(),
        "--start",
    ]);
    let v = d.vm("web1");
    assert_eq!(v["state"], "running");
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(v["spec"]["disks"][1]["read_only"], true);
    assert_eq!(v["spec"]["disks"][1]["serial"], "cidata");
    let seed = std::fs::read(disks[1].as_str().unwrap()).unwrap();
    let text = String::from_utf8_lossy(&seed);
    for want in [
        "CIDATA",
        "local-hostname: web1.example",
        "#cloud-config\nhostname: web1.example",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA me@laptop",
    ] {
        assert!(text.contains(want), "{want} not in the seed");
    }
    d.ok(&["vm", "kill", "web1"]);
    d.ok(&["vm", "delete", "web1"]);
    assert!(!Path::new(disks[1].as_str().unwrap()).exists());
}

/// A snapshot of a VM with its disk: the VM goes on; stopped, it comes back from the snapshot
/// with the disk as it was (the bundled guest wrote its pattern before the snapshot).
#[test]
fn a_vm_snapshot_restores_memory_and_disk() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-snap");
    let d = Daemon::start(&dir.0);
    d.idle_template_with_disk(&dir, 32 << 20);
    d.ok(&["vm", "create", "a", "-t", "t", "--start"]);
    let before = d.vm("a")["disks"][0].as_str().unwrap().to_string();
    // The guest writes its pattern at boot; wait until it is on the disk.
    let image_sector = |disk: &str, sector: u64| {
        let raw = dir.file("read.raw");
        let _ = std::fs::remove_file(&raw);
        let o = vessel(&["image", "convert", "-O", "raw", disk, raw.to_str().unwrap()]);
        assert_code(&o, 0);
        common::sector(&raw, sector)
    };
    let pattern = b"vessel virtio-blk sector 8\n";
    // (In the qcow2 file's data clusters: the image is in use, and locked.)
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    wait_until("the guest's pattern", || {
        contains(&std::fs::read(&before).unwrap(), pattern)
    });
    d.ok(&["vm", "snapshot", "create", "a", "s1"]);
    let v = d.vm("a");
    assert_eq!(v["state"], "running");
    let after = v["disks"][0].as_str().unwrap().to_string();
    assert_ne!(after, before, "the VM goes on with a new overlay");
    assert!(after.ends_with(".s1.qcow2"), "{after}");
    let listed = d.json(&["vm", "snapshot", "list", "a"]);
    assert_eq!(listed[0]["name"], "s1");
    // Restoring needs the VM stopped.
    let o = d.vessel(&["vm", "snapshot", "restore", "a", "s1"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("stop it first"), "{}", stderr(&o));
    d.ok(&["vm", "kill", "a"]);
    d.ok(&["vm", "snapshot", "restore", "a", "s1"]);
    let v = d.vm("a");
    assert_eq!(v["state"], "running");
    let restored = v["disks"][0].as_str().unwrap().to_string();
    assert!(restored.contains("/snapshots/s1/"), "{restored}");
    // The VM's own API says it was restored and runs.
    let api = v["api_socket"].as_str().unwrap().to_string();
    let o = ctl(Path::new(&api), &["--json", "info"]);
    let info: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(info["state"], "running");
    let events = d.events();
    for want in ["vm.snapshot-created a s1", "vm.snapshot-restoring a s1"] {
        assert!(
            events.iter().any(|e| e.starts_with(want)),
            "{want}: {events:#?}"
        );
    }
    // Deleting the snapshot keeps the overlay the VM now writes to.
    d.ok(&["vm", "snapshot", "delete", "a", "s1"]);
    assert!(Path::new(&restored).exists());
    assert_eq!(
        d.json(&["vm", "snapshot", "list", "a"]),
        serde_json::json!([])
    );
    d.ok(&["vm", "kill", "a"]);
    // Its disk, read through the chain, has what the guest wrote before the snapshot.
    assert!(image_sector(&restored, 8).starts_with(pattern));
    // Started again: it boots on its current disks.
    d.ok(&["vm", "start", "a"]);
    assert_eq!(d.vm("a")["disks"][0].as_str().unwrap(), restored);
    d.ok(&["vm", "kill", "a"]);
    d.ok(&["vm", "delete", "a"]);
    assert_eq!(std::fs::read_dir(d.state.join("vms")).unwrap().count(), 0);
}

/// With `--vm-jail`, every VM runs jailed as that user (its files made the user's), and
/// everything still works: start, the console, a kill and the restart, delete.
#[test]
fn the_daemon_starts_every_vm_in_the_jail() {
    require_root();
    let dir = TempDir::new("manager-jail");
    let d = Daemon::start_with(&dir.0, &["--vm-jail", "uid=64123,gid=64123"]);
    d.idle_template_with_disk(&dir, 4 << 20);
    d.ok(&["vm", "create", "a", "-t", "t", "--start"]);
    let v = d.vm("a");
    assert_eq!(v["state"], "running", "{v}");
    // The process the daemon watches is the jail's keeper; the VMM below it is the user's.
    let keeper = v["pid"].as_u64().unwrap();
    let children =
        std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap();
    let vmm: u64 = children.split_whitespace().next().unwrap().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "64123"),
        "{uid}"
    );
    use std::os::unix::fs::MetadataExt;
    let disk = v["disks"][0].as_str().unwrap();
    assert_eq!(std::fs::metadata(disk).unwrap().uid(), 64123);
    // Killed from outside (the VMM itself): restarted, jailed again.
    Command::new("kill")
        .args(["-KILL", &vmm.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = d.vm("a");
        if v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p != keeper) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a not restarted: {v}\nevents: {:#?}",
            d.events()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Migrated live to another jailed daemon, with a snapshot's layer below its disk: its
    // empty VMM may open the whole chain, and writes the top.
    d.ok(&["vm", "snapshot", "create", "a", "s1"]);
    let b = Daemon::start_with(&dir.0.join("b"), &["--vm-jail", "uid=64123,gid=64123"]);
    d.ok(&[
        "vm",
        "migrate",
        "a",
        "--to-socket",
        b.socket.to_str().unwrap(),
    ]);
    assert_eq!(b.vm("a")["state"], "running");
    b.ok(&["vm", "kill", "a"]);
    b.ok(&["vm", "delete", "a"]);
    assert_eq!(std::fs::read_dir(d.state.join("vms")).unwrap().count(), 0);
}

/// Suspended to disk (a host going down), the VMs come back where they were when the daemon
/// starts again; one suspended by hand comes back with `vm start`.
#[test]
fn suspended_vms_come_back_when_the_daemon_starts_again() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-suspend");
    let d = Daemon::start(&dir.0);
    d.idle_template_with_disk(&dir, 8 << 20);
    for n in ["a", "b"] {
        d.ok(&["vm", "create", n, "-t", "t", "--start"]);
    }
    let pids: Vec<u64> = ["a", "b"]
        .iter()
        .map(|n| d.vm(n)["pid"].as_u64().unwrap())
        .collect();
    let out = d.ok(&["vm", "suspend", "--all"]);
    assert!(
        out.contains("a: suspended") && out.contains("b: suspended"),
        "{out}"
    );
    for (n, p) in ["a", "b"].iter().zip(&pids) {
        assert_eq!(d.vm(n)["state"], "suspended");
        assert!(!alive(*p), "{n} still runs");
    }
    let events = d.events();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.starts_with("vm.suspended"))
            .count(),
        2,
        "{events:#?}"
    );
    // The host comes back: the daemon restores them.
    let dir_path = dir.0.clone();
    assert_eq!(d.stop(), Some(0));
    let d = Daemon::start(&dir_path);
    for n in ["a", "b"] {
        // The daemon answers at once and restores its VMs meanwhile.
        wait_until("restored", || d.vm(n)["state"] == "running");
        let v = d.vm(n);
        let disk = v["disks"][0].as_str().unwrap();
        assert!(
            disk.contains("/suspended/"),
            "restored onto new overlays: {disk}"
        );
        let saved = Path::new(disk).parent().unwrap();
        assert!(!saved.join("memory").exists(), "the saved memory is spent");
        let api = v["api_socket"].as_str().unwrap().to_string();
        let info: Value =
            serde_json::from_str(&stdout(&ctl(Path::new(&api), &["--json", "info"]))).unwrap();
        assert_eq!(info["state"], "running");
    }
    // By hand: suspend, then start.
    d.ok(&["vm", "suspend", "a"]);
    assert_eq!(d.vm("a")["state"], "suspended");
    d.ok(&["vm", "start", "a"]);
    assert_eq!(d.vm("a")["state"], "running");
    for n in ["a", "b"] {
        d.ok(&["vm", "kill", n]);
        d.ok(&["vm", "delete", n]);
    }
    assert_eq!(std::fs::read_dir(d.state.join("vms")).unwrap().count(), 0);
}

/// Storage pools and volumes: the default pool, a pool of a directory, volumes made, resized,
/// uploaded (hostile images refused), used as a template's base and attached to a VM, never
/// deleted while in use, and outliving the VM they were attached to.
#[test]
fn pools_and_volumes() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-pools");
    let d = Daemon::start(&dir.0);
    let pools = d.json(&["pool", "list"]);
    assert_eq!(pools[0]["name"], "default", "{pools}");
    assert_eq!(
        pools[0]["path"].as_str().unwrap(),
        d.state.join("images").to_str().unwrap()
    );
    let pdir = dir.file("pool-p");
    d.ok(&["pool", "create", "p", "--path", pdir.to_str().unwrap()]);
    // The same directory twice, a relative name, a bad name: refused.
    let o = d.vessel(&["pool", "create", "q", "--path", pdir.to_str().unwrap()]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("is pool p already"), "{}", stderr(&o));
    let o = d.vessel(&["volume", "create", "p", "../x", "--size", "1M"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("name:"), "{}", stderr(&o));

    // Made, listed, resized.
    d.ok(&["volume", "create", "p", "data", "--size", "16M"]);
    let v = d.json(&["volume", "info", "p", "data"]);
    assert_eq!(
        (v["format"].as_str(), v["size"].as_u64()),
        (Some("qcow2"), Some(16 << 20))
    );
    d.ok(&["volume", "resize", "p", "data", "32M"]);
    assert_eq!(d.json(&["volume", "info", "p", "data"])["size"], 32 << 20);
    let o = d.vessel(&["volume", "resize", "p", "data", "8M"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("shrink"), "{}", stderr(&o));

    // Uploaded: a raw image becomes a volume; an image naming a backing file, or a corrupt
    // qcow2 image, is refused and leaves nothing.
    let base = dir.file("base.raw");
    raw_disk(&base, 8 << 20);
    d.ok(&["volume", "upload", "p", "base", base.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(pdir.join("base")).unwrap(),
        std::fs::read(&base).unwrap()
    );
    let sneaky = dir.file("sneaky.qcow2");
    let o = vessel(&[
        "image",
        "create",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        sneaky.to_str().unwrap(),
    ]);
    assert_code(&o, 0);
    let o = d.vessel(&["volume", "upload", "p", "sneaky", sneaky.to_str().unwrap()]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("backing file"), "{}", stderr(&o));
    let broken = dir.file("broken.qcow2");
    let o = vessel(&["image", "create", broken.to_str().unwrap(), "4M"]);
    assert_code(&o, 0);
    let mut bytes = std::fs::read(&broken).unwrap();
    bytes[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes()); // l1 table far past the end
    std::fs::write(&broken, bytes).unwrap();
    let o = d.vessel(&["volume", "upload", "p", "broken", broken.to_str().unwrap()]);
    assert_code(&o, 2);
    let names: Vec<String> = std::fs::read_dir(&pdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["base", "data"]);

    // A template on a volume, a VM with a volume attached.
    d.ok(&[
        "template",
        "create",
        "t",
        "--cmdline",
        "console=ttyS0 action=idle",
        "--disk",
        "p/base",
    ]);
    d.ok(&[
        "vm",
        "create",
        "a",
        "-t",
        "t",
        "--volume",
        "p/data",
        "--disk-size",
        "16M",
        "--start",
    ]);
    let v = d.vm("a");
    assert_eq!(v["state"], "running");
    assert_eq!(
        v["disks"][1].as_str().unwrap(),
        pdir.join("data").to_str().unwrap()
    );
    let first = d.json(&["volume", "info", "p", "base"]);
    assert_eq!(first["used_by"], serde_json::json!(["template:t"]));
    let info = vessel(&[
        "image",
        "info",
        "--json",
        "-U",
        v["disks"][0].as_str().unwrap(),
    ]);
    let info: Value = serde_json::from_str(&stdout(&info)).unwrap();
    assert_eq!(
        info["virtual-size"],
        16 << 20,
        "--disk-size grows the overlay"
    );
    let o = d.vessel(&["volume", "resize", "p", "data", "64M"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("running"), "{}", stderr(&o));
    for (pool_or_vol, args) in [
        ("volume", vec!["volume", "delete", "p", "data"]),
        ("volume", vec!["volume", "delete", "p", "base"]),
        ("pool", vec!["pool", "delete", "p"]),
    ] {
        let o = d.vessel(&args);
        assert_code(&o, 1);
        assert!(
            stderr(&o).contains("in use"),
            "{pool_or_vol}: {}",
            stderr(&o)
        );
    }
    assert_eq!(d.json(&["pool", "info", "p"])["volumes"], 2);

    // The VM goes; the attached volume stays, free again.
    d.ok(&["vm", "kill", "a"]);
    d.ok(&["vm", "delete", "a"]);
    assert!(pdir.join("data").exists());
    assert_eq!(
        d.json(&["volume", "info", "p", "data"]).get("used_by"),
        None
    );
    d.ok(&["template", "delete", "t"]);
    d.ok(&["volume", "delete", "p", "data"]);
    d.ok(&["volume", "delete", "p", "base"]);
    d.ok(&["pool", "delete", "p"]);
    assert_eq!(std::fs::read_dir(&pdir).unwrap().count(), 0);
    let events = d.events();
    for want in [
        "pool.created p",
        "volume.uploaded p/base",
        "volume.resized p/data",
        "pool.deleted p",
    ] {
        assert!(
            events.iter().any(|e| e.starts_with(want)),
            "{want}: {events:#?}"
        );
    }
}

/// `vm edit` (flags, a spec file, $EDITOR), `vm clone` of a VM with a snapshot (the clone
/// stands on its own), and a template made from a stopped VM.
#[test]
fn edit_clone_and_template_from_a_vm() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-edit");
    let d = Daemon::start(&dir.0);
    d.idle_template_with_disk(&dir, 32 << 20);
    d.ok(&["vm", "create", "a", "-t", "t", "--start", "--hostname", "a"]);
    let pattern = b"vessel virtio-blk sector 8\n";
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let disk = d.vm("a")["disks"][0].as_str().unwrap().to_string();
    wait_until("the guest's pattern", || {
        contains(&std::fs::read(&disk).unwrap(), pattern)
    });
    // A snapshot: a's disk is now an overlay on a layer inside its directory.
    d.ok(&["vm", "snapshot", "create", "a", "s1"]);

    // Edits: refused while it would break, the field named when bad.
    let o = d.vessel(&["vm", "clone", "a", "b"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("stop it first"), "{}", stderr(&o));
    d.ok(&[
        "vm",
        "edit",
        "a",
        "--memory",
        "96M",
        "--restart",
        "never",
        "--delay",
        "3",
    ]);
    let v = d.vm("a");
    assert_eq!(
        (v["spec"]["memory"].as_u64(), v["restart"].as_str()),
        (Some(96 << 20), Some("never"))
    );
    assert_eq!(v["autostart_delay_s"], 3);
    let o = d.vessel(&["vm", "edit", "a", "--cpus", "0"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("cpus"), "{}", stderr(&o));
    d.ok(&["vm", "kill", "a"]);
    // $EDITOR on its spec.
    let o = Command::new(VESSEL)
        .args(["vm", "edit", "a", "--socket", d.socket.to_str().unwrap()])
        .env("EDITOR", "sed -i s/\\\"cpus\\\":\\ 1,/\\\"cpus\\\":\\ 2,/")
        .output()
        .unwrap();
    assert_code(&o, 0);
    assert_eq!(d.vm("a")["spec"]["cpus"], 2);
    d.ok(&["vm", "start", "a"]);
    let api = d.vm("a")["api_socket"].as_str().unwrap().to_string();
    let info: Value =
        serde_json::from_str(&stdout(&ctl(Path::new(&api), &["--json", "info"]))).unwrap();
    assert_eq!(info["vcpus"], 2, "{info}");
    d.ok(&["vm", "kill", "a"]);

    // A clone: its own disks (the snapshot's layer folded in), a new seed and MACs.
    d.ok(&["vm", "clone", "a", "b"]);
    let b = d.vm("b");
    assert_eq!(b["cloud_init"]["hostname"], "b");
    let b_disk = b["disks"][0].as_str().unwrap().to_string();
    assert!(
        b_disk.starts_with(d.state.join("vms/b").to_str().unwrap()),
        "{b_disk}"
    );
    let chain = vessel(&["image", "info", "--backing-chain", "--json", &b_disk]);
    assert_code(&chain, 0);
    let chain = stdout(&chain);
    assert!(
        chain.contains("base.raw") && !chain.contains("/vms/a/"),
        "{chain}"
    );
    // a goes; b keeps what a wrote, and boots.
    d.ok(&["vm", "delete", "a"]);
    let read_sector = |disk: &str| {
        let raw = dir.file("read.raw");
        let _ = std::fs::remove_file(&raw);
        assert_code(
            &vessel(&["image", "convert", "-O", "raw", disk, raw.to_str().unwrap()]),
            0,
        );
        common::sector(&raw, 8)
    };
    assert!(read_sector(&b_disk).starts_with(pattern));
    d.ok(&["vm", "start", "b"]);
    assert_eq!(d.vm("b")["state"], "running");
    d.ok(&["vm", "kill", "b"]);

    // A template from b: a flattened base; a VM from it has b's data.
    d.ok(&["template", "create", "t2", "--from-vm", "b"]);
    let t2 = d.json(&["template", "list"]);
    let t2 = t2
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "t2")
        .unwrap()
        .clone();
    let base = t2["base_disks"][0].as_str().unwrap().to_string();
    assert!(
        base.starts_with(d.state.join("templates/t2").to_str().unwrap()),
        "{base}"
    );
    assert_eq!(
        t2["spec"]["disks"].as_array().unwrap().len(),
        1,
        "the seed stays with b"
    );
    d.ok(&["vm", "create", "c", "-t", "t2"]);
    let c_disk = d.vm("c")["disks"][0].as_str().unwrap().to_string();
    assert!(read_sector(&c_disk).starts_with(pattern));
    d.ok(&["vm", "delete", "c"]);
    d.ok(&["vm", "delete", "b"]);
    d.ok(&["template", "delete", "t2"]);
    assert!(!Path::new(&base).exists());
    assert_eq!(std::fs::read_dir(d.state.join("vms")).unwrap().count(), 0);
}

/// Autostarted VMs start in their order, each waiting for the delay of the one before.
#[test]
fn autostart_keeps_order_and_delay() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-autostart");
    let d = Daemon::start(&dir.0);
    d.ok(&[
        "template",
        "create",
        "t",
        "--cmdline",
        "console=ttyS0 action=idle",
    ]);
    d.ok(&[
        "vm",
        "create",
        "late",
        "-t",
        "t",
        "--autostart",
        "--order",
        "2",
    ]);
    d.ok(&[
        "vm",
        "create",
        "early",
        "-t",
        "t",
        "--autostart",
        "--order",
        "1",
        "--delay",
        "2",
    ]);
    d.ok(&["vm", "create", "manual", "-t", "t"]);
    assert_eq!(d.stop(), Some(0));
    let d = Daemon::start(&dir.0);
    wait_until("both autostarted", || {
        d.vm("early")["state"] == "running" && d.vm("late")["state"] == "running"
    });
    assert_eq!(d.vm("manual")["state"], "stopped");
    let events = d.json(&["events"]);
    let started = |name: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "vm.started" && e["subject"] == name)
            .unwrap()["time_ms"]
            .as_u64()
            .unwrap()
    };
    let gap = started("late") - started("early");
    assert!(gap >= 2000, "late started {gap} ms after early");
    for n in ["early", "late"] {
        d.ok(&["vm", "kill", n]);
    }
}

/// `vessel vm migrate` between two daemons (their VMs' storage shared, as on one host): the
/// VM moves live, running there on the same disks and gone from here; the target's policy
/// restarts it from then on. A target that cannot take it, or a wrong secret, leaves it
/// running here.
#[test]
fn a_vm_migrates_live_to_another_daemon() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-migrate");
    let a = Daemon::start(&dir.0.join("a"));
    let b = Daemon::start(&dir.0.join("b"));
    a.idle_template_with_disk(&dir, 16 << 20);
    a.ok(&["vm", "create", "m", "-t", "t", "--start"]);
    let before = a.vm("m");
    let disk = before["disks"][0].as_str().unwrap().to_string();
    let b_sock = b.socket.to_str().unwrap().to_string();

    // A target with a VM of that name refuses; the VM runs on here.
    b.ok(&[
        "template",
        "create",
        "t",
        "--cmdline",
        "console=ttyS0 action=idle",
    ]);
    b.ok(&["vm", "create", "m", "-t", "t"]);
    let o = a.vessel(&["vm", "migrate", "m", "--to-socket", &b_sock]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    assert_eq!(a.vm("m")["state"], "running");
    b.ok(&["vm", "delete", "m"]);

    // A wrong secret: the source's VMM refuses to go on; the VM runs on here.
    let bc = manager::client::Client::new(&b.socket);
    let ready: Value = bc
        .send_json(
            "POST",
            "/api/v1/migrations/incoming",
            &serde_json::json!({ "vm": a.vm("m") }),
        )
        .unwrap();
    assert_eq!(b.vm("m")["state"], "incoming");
    let ac = manager::client::Client::new(&a.socket);
    let r: Result<Value, _> = ac.send_json(
        "PUT",
        "/api/v1/vms/m/migrate",
        &serde_json::json!({ "to": ready["listen"], "token": "0123456789abcdef-wrong" }),
    );
    assert!(r.is_err(), "{r:?}");
    assert_eq!(a.vm("m")["state"], "running");
    assert_eq!(a.vm("m")["pid"], before["pid"]);
    b.ok(&["vm", "kill", "m"]);
    wait_until("b forgets the VM that did not come", || {
        !b.ok(&["vm", "list"]).contains("\nm ")
    });
    assert!(a
        .events()
        .iter()
        .any(|e| e.starts_with("vm.migration-failed m")));

    // The real thing.
    let out = a.ok(&["vm", "migrate", "m", "--to-socket", &b_sock]);
    assert!(out.contains("m: migrated"), "{out}");
    assert!(a.json(&["vm", "list"]).as_array().unwrap().is_empty());
    let there = b.vm("m");
    assert_eq!(there["state"], "running", "{there}");
    assert_eq!(there["disks"][0].as_str().unwrap(), disk, "the same disk");
    let api = there["api_socket"].as_str().unwrap().to_string();
    let info: Value =
        serde_json::from_str(&stdout(&ctl(Path::new(&api), &["--json", "info"]))).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    let pid = there["pid"].as_u64().unwrap();
    assert!(processes_with(&api).iter().any(|c| c.contains(" serve ")));
    assert!(
        !alive(before["pid"].as_u64().unwrap()),
        "the source's VMM ended"
    );
    let events = a.events();
    assert!(
        events.iter().any(|e| e.starts_with("vm.migrated m")),
        "{events:#?}"
    );
    let events = b.events();
    for want in ["vm.incoming m", "vm.migrated-in m"] {
        assert!(
            events.iter().any(|e| e.starts_with(want)),
            "{want}: {events:#?}"
        );
    }
    // It is b's now: killed from outside, b's policy restarts it (booting on its disk).
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("m restarted on b", || {
        let v = b.vm("m");
        v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p != pid)
    });
    // And back home: a's directory for it is its home again.
    let a_sock = a.socket.to_str().unwrap().to_string();
    b.ok(&["vm", "migrate", "m", "--to-socket", &a_sock]);
    let home = a.vm("m");
    assert_eq!(home["state"], "running", "{home}");
    assert_eq!(home.get("home"), None);
    assert_eq!(std::fs::read_dir(b.state.join("vms")).unwrap().count(), 0);
    a.ok(&["vm", "kill", "m"]);
    a.ok(&["vm", "delete", "m"]);
    assert!(!Path::new(&disk).exists(), "its disk goes with it");
    assert_eq!(std::fs::read_dir(a.state.join("vms")).unwrap().count(), 0);
}

/// With `--vm-uids`, every jailed VM runs as a user of its own, kept across restarts and
/// given back when the VM goes; a full range is a clear refusal.
#[test]
fn each_jailed_vm_runs_as_its_own_user() {
    require_root();
    let dir = TempDir::new("manager-uids");
    let d = Daemon::start_with(&dir.0, &["--vm-uids", "64200-64201"]);
    d.idle_template_with_disk(&dir, 4 << 20);
    let vmm_uid = |name: &str| -> u32 {
        let keeper = d.vm(name)["pid"].as_u64().unwrap();
        let children =
            std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap();
        let vmm: u64 = children.split_whitespace().next().unwrap().parse().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        uid.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    use std::os::unix::fs::MetadataExt;
    let disk_owner = |name: &str| {
        let v = d.vm(name);
        std::fs::metadata(v["disks"][0].as_str().unwrap())
            .unwrap()
            .uid()
    };
    for n in ["a", "b", "c"] {
        d.ok(&["vm", "create", n, "-t", "t"]);
    }
    d.ok(&["vm", "start", "a"]);
    d.ok(&["vm", "start", "b"]);
    let (ua, ub) = (vmm_uid("a"), vmm_uid("b"));
    assert_eq!((ua, ub), (64200, 64201));
    assert_eq!((disk_owner("a"), disk_owner("b")), (64200, 64201));
    assert_eq!(d.vm("a")["jail_uid"], 64200);
    // None left for c.
    let o = d.vessel(&["vm", "start", "c"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("no free user id"), "{}", stderr(&o));
    // a keeps its user across a restart; once deleted, c gets it.
    d.ok(&["vm", "restart", "a", "--timeout", "1"]);
    assert_eq!(vmm_uid("a"), 64200);
    d.ok(&["vm", "kill", "a"]);
    d.ok(&["vm", "delete", "a"]);
    d.ok(&["vm", "start", "c"]);
    assert_eq!(vmm_uid("c"), 64200);
    for n in ["b", "c"] {
        d.ok(&["vm", "kill", n]);
        d.ok(&["vm", "delete", n]);
    }
}
