//! `vessel run --config FILE` and `--print-config`: the flags and a JSON document describe the
//! same VM (a spec and its host bindings), and a bad document is refused by field.

mod common;

use common::virtio::assert_block_pattern;
use common::*;
use serde_json::{json, Value};

/// The document `vessel run --print-config ARGS` prints.
fn printed(args: &[&str]) -> Value {
    let mut all = vec!["run", "--print-config"];
    all.extend_from_slice(args);
    let o = vessel(&all);
    assert_code(&o, 0);
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

#[test]
fn the_flags_print_the_document_they_describe() {
    let d = printed(&[
        "--cpus",
        "2",
        "--memory",
        "128M",
        "--disk",
        "path=/img/a.qcow2,readonly=on,queues=2,iops=100",
        "--net",
        "tap=vt0,mac=52:54:00:00:00:01",
        "--vsock",
        "cid=7,socket=/run/v.sock",
        "--balloon",
        "size=16M",
        "--console",
        "off",
        "--transport",
        "pci",
    ]);
    let spec = &d["spec"];
    assert_eq!(spec["version"], 1);
    assert_eq!(spec["cpus"], 2);
    assert_eq!(spec["memory"], 128u64 << 20);
    assert_eq!(spec["transport"], "pci");
    assert_eq!(spec["disks"][0]["read_only"], true);
    assert_eq!(spec["disks"][0]["queues"], 2);
    assert_eq!(spec["disks"][0]["rate_limit"]["ops"]["size"], 100);
    assert_eq!(spec["nets"][0]["mac"], "52:54:00:00:00:01");
    assert_eq!(spec["vsock"]["cid"], 7);
    assert_eq!(spec["balloon"]["size"], 16u64 << 20);
    // Host paths are bindings only: none in the spec.
    let text = spec.to_string();
    assert!(
        !text.contains("/img/") && !text.contains("vt0") && !text.contains("/run/"),
        "{text}"
    );
    let b = &d["bindings"];
    assert_eq!(b["disks"], json!(["/img/a.qcow2"]));
    assert_eq!(b["taps"], json!(["vt0"]));
    assert_eq!(b["vsock_socket"], "/run/v.sock");
    assert_eq!(b["console"], "off");
}

#[test]
fn a_document_boots_the_same_vm_as_the_flags() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("config-file");
    let disk = dir.file("disk.raw");
    raw_disk(&disk, 32 << 20);
    let disk_flag = format!("path={},serial=from-a-file", disk.display());
    // What the flags print boots as a file, and says the same.
    let doc = printed(&[
        "--cpus",
        "2",
        "--disk",
        &disk_flag,
        "--cmdline",
        "console=ttyS0 x=1",
    ]);
    let file = dir.file("vm.json");
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let o = vessel(&["run", "--config", file.to_str().unwrap()]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("all 2 cpus ran in ring 3"), "{out}");
    assert!(out.contains("cmdline: console=ttyS0 x=1"), "{out}");
    assert!(out.contains("serial 'from-a-file'"), "{out}");
    assert_block_pattern(&disk, 65535);
    let again = printed(&["--config", file.to_str().unwrap()]);
    assert_eq!(again, doc);
    // A hand-written document: defaults fill in the rest, sizes take units.
    std::fs::write(&file, r#"{"spec": {"memory": "96M", "cpus": 3}}"#).unwrap();
    let o = vessel(&[
        "run",
        "--config",
        file.to_str().unwrap(),
        "--console",
        "stdio",
    ]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("all 3 cpus ran in ring 3"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_bad_document_is_refused_naming_the_field() {
    let dir = TempDir::new("config-bad");
    let file = dir.file("vm.json");
    let refused = |doc: &str, want: &str| {
        std::fs::write(&file, doc).unwrap();
        let o = vessel(&["run", "--config", file.to_str().unwrap()]);
        assert_code(&o, 2);
        let e = stderr(&o);
        assert!(e.contains(want), "{doc}: want '{want}' in: {e}");
        assert!(e.contains("vm.json"), "{e}");
    };
    refused(r#"{"spec": {"cpu": 2}}"#, "unknown field `cpu`");
    refused(r#"{"spec": {"cpus": 0}}"#, "cpus: must be at least 1");
    refused(
        r#"{"spec": {"disks": [{"queues": 99}]}, "bindings": {"disks": ["/x"]}}"#,
        "disks[0].queues: queues takes a number from 1 to 64",
    );
    refused(
        r#"{"spec": {"disks": [{}]}}"#,
        "bindings.disks: 0 given for 1 disks",
    );
    refused(
        r#"{"spec": {"nets": [{"mac": "01:00:5e:00:00:01"}]}, "bindings": {"taps": ["t"]}}"#,
        "multicast",
    );
    refused(
        r#"{"spec": {"version": 9}}"#,
        "version: 9 is not a spec version",
    );
    refused(r#"{"spec": {"memory": "lots"}}"#, "'lots' is not a size");
    refused("not json", "expected");
    // Flags that describe the VM conflict with a document.
    let o = vessel(&["run", "--config", file.to_str().unwrap(), "--cpus", "2"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    let o = vessel(&["run", "--config", "/nonexistent/vm.json"]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains("/nonexistent/vm.json"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn vessel_serve_boots_a_document_put_on_its_api() {
    use common::soak::Console;
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("serve-boot");
    let api = dir.file("api.sock");
    let api = api.to_str().unwrap();
    let mut vm = Console::spawn(&["serve", "--api-socket", api]);
    wait_for(std::path::Path::new(api));
    let file = dir.file("vm.json");
    // A bad document: refused by field, and the process still waits for a good one.
    std::fs::write(&file, r#"{"spec": {"nets": [{}]}}"#).unwrap();
    let o = ctl(std::path::Path::new(api), &["boot", file.to_str().unwrap()]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains("bindings.nets: 0 given for 1"),
        "{}",
        stderr(&o)
    );
    let doc = json!({
        "spec": {"cpus": 2, "boot": {"cmdline": "console=ttyS0 action=soak soakms=50"}},
    });
    std::fs::write(&file, doc.to_string()).unwrap();
    let o = ctl(std::path::Path::new(api), &["boot", file.to_str().unwrap()]);
    assert_code(&o, 0);
    vm.soak_lines(2, 2);
    let o = ctl(std::path::Path::new(api), &["--json", "info"]);
    assert_code(&o, 0);
    let info: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    // One VM per process.
    let o = ctl(std::path::Path::new(api), &["boot", file.to_str().unwrap()]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("has a VM already"), "{}", stderr(&o));
    vm.soak_lines(2, 1);
    assert_eq!(vm.stop(), Some(143));
}
