//! `vessel vm define` (a VM from a whole spec and its images, used in place) and `vm delete
//! --keep-disks`, on the direct host.

mod common;

use std::path::Path;

use common::daemon::*;
use common::*;

#[test]
fn a_defined_vm_uses_its_images_in_place_and_leaves_them() {
    assert!(have_kvm(), "/dev/kvm is required");
    let dir = TempDir::new("manager-define");
    let d = Daemon::start(&dir.0);
    let image = dir.file("mine.raw");
    raw_disk(&image, 8 << 20);
    let spec = dir.file("spec.json");
    let o = vessel(&[
        "run",
        "--cmdline",
        "console=ttyS0 action=idle",
        "--memory",
        "96M",
        "--disk",
        &format!("path={}", image.display()),
        "--print-config",
    ]);
    assert_code(&o, 0);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    std::fs::write(&spec, doc["spec"].to_string()).unwrap();
    // The images must match the spec's disks.
    let o = d.vessel(&["vm", "define", "mine", "--spec", spec.to_str().unwrap()]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("disks: 0 given"), "{}", stderr(&o));
    let img = image.to_str().unwrap();
    d.ok(&[
        "vm",
        "define",
        "mine",
        "--spec",
        spec.to_str().unwrap(),
        "--disk",
        img,
        "--start",
    ]);
    let v = d.vm("mine");
    assert_eq!(
        (v["state"].as_str(), v["template"].as_str()),
        (Some("running"), Some(""))
    );
    assert_eq!(v["disks"][0], img);
    assert_eq!(v["spec"]["memory"], 96 << 20);
    // The guest writes its pattern at boot: on the image itself.
    let pattern = b"vessel virtio-blk sector 8\n";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !common::sector(&image, 8).starts_with(pattern) {
        assert!(
            std::time::Instant::now() < deadline,
            "no pattern on the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.ok(&["vm", "kill", "mine"]);
    d.ok(&["vm", "delete", "mine"]);
    assert!(
        Path::new(img).exists(),
        "a defined VM's image is the user's"
    );

    // A template's VM deleted with --keep-disks: its overlay stays where it was.
    d.idle_template_with_disk(&dir, 4 << 20);
    d.ok(&["vm", "create", "k", "-t", "t"]);
    let overlay = d.vm("k")["disks"][0].as_str().unwrap().to_string();
    d.ok(&["vm", "delete", "k", "--keep-disks"]);
    assert!(Path::new(&overlay).exists());
    assert!(d.vessel(&["vm", "info", "k"]).status.code() == Some(1));
    // Without: gone with the VM.
    d.ok(&["vm", "create", "g", "-t", "t"]);
    let gone = d.vm("g")["disks"][0].as_str().unwrap().to_string();
    d.ok(&["vm", "delete", "g"]);
    assert!(!Path::new(&gone).exists());
}
