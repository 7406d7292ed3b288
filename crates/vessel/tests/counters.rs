//! `GET /api/v1/vm.counters` (and `vessel ctl counters`) against the bundled guest on this
//! host's KVM: a guest that soaks with `soakdisk=on` reads, writes and flushes its disk once a
//! round, so its disk counters must grow with the rounds it reports, add up with what its block
//! test and soak steps do, and stand still while the VM is paused (when they must still
//! answer). The network counters are checked against a tap in `net.rs`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use api::client::Client;
use api::types::VmCounters;
use common::soak::Console;
use common::*;

const CPUS: usize = 2;

/// Reads console lines until the guest reported `n` more disk steps; returns the last step.
/// Fails on a mismatch or a failure line.
fn disk_steps(c: &mut Console, n: usize) -> u64 {
    let mut last = 0;
    let mut seen = 0;
    while seen < n {
        let line = c.line(Duration::from_secs(60));
        assert!(
            !line.contains("MISMATCH") && !line.starts_with("FAIL"),
            "{}",
            c.seen
        );
        if let Some(rest) = line.strip_prefix("soak disk step=") {
            last = rest.strip_suffix(" ok").unwrap().parse().unwrap();
            seen += 1;
        }
    }
    last
}

/// Every number in `v`, by its path (`disks.0.read_ops`).
fn numbers(v: &serde_json::Value, path: &str, out: &mut BTreeMap<String, u64>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                numbers(v, &format!("{path}{k}."), out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                numbers(v, &format!("{path}{i}."), out);
            }
        }
        serde_json::Value::Number(n) => {
            out.insert(path.trim_end_matches('.').to_string(), n.as_u64().unwrap());
        }
        _ => {}
    }
}

/// Asserts that `later` has every counter of `earlier`, none smaller.
fn assert_not_below(later: &VmCounters, earlier: &VmCounters) {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    numbers(&serde_json::to_value(earlier).unwrap(), "", &mut a);
    numbers(&serde_json::to_value(later).unwrap(), "", &mut b);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same counters"
    );
    for (k, v) in &a {
        assert!(b[k] >= *v, "{k} went from {v} down to {}", b[k]);
    }
}

/// What holds of any counters of this test's VM: one entry per vCPU whose total is the sum of
/// its kinds, the one disk's bytes whole sectors and within what its requests can carry (the
/// guest never moves more than 8 sectors in one request), no errors, no network device.
fn assert_consistent(c: &VmCounters) {
    assert_eq!(c.vcpus.len(), CPUS, "{c:?}");
    for (i, v) in c.vcpus.iter().enumerate() {
        assert_eq!(v.index as usize, i, "{c:?}");
        let kinds = v.io_exits
            + v.mmio_exits
            + v.hlt_exits
            + v.interrupted_exits
            + v.shutdown_exits
            + v.system_event_exits
            + v.other_exits;
        assert_eq!(v.exits, kinds, "vcpu {i}: {v:?}");
        assert_eq!(
            (v.shutdown_exits, v.system_event_exits, v.other_exits),
            (0, 0, 0),
            "vcpu {i} of a running VM: {v:?}"
        );
    }
    assert_eq!(c.disks.len(), 1, "{c:?}");
    let d = &c.disks[0];
    assert_eq!((d.id.as_str(), d.index), ("block0", 0), "{d:?}");
    for (what, ops, bytes) in [
        ("read", d.read_ops, d.read_bytes),
        ("write", d.write_ops, d.write_bytes),
    ] {
        assert_eq!(bytes % 512, 0, "{what}: {d:?}");
        assert!(
            bytes >= ops * 512 && bytes <= ops * 4096,
            "{what}: {ops} requests of {bytes} bytes: {d:?}"
        );
    }
    assert_eq!(
        (d.discard_ops, d.write_zeroes_ops, d.errors),
        (0, 0, 0),
        "{d:?}"
    );
    assert!(c.nics.is_empty(), "{c:?}");
}

#[test]
fn counters_follow_a_guest_writing_its_disk_and_stand_still_while_paused() {
    let tmp = TempDir::new("counters");
    let disk = tmp.file("disk.raw");
    raw_disk(&disk, 1 << 20);
    let socket = tmp.file("api.sock");
    let mut vm = Console::spawn(&[
        "run",
        "--cpus",
        &CPUS.to_string(),
        "--memory",
        "128M",
        "--api-socket",
        socket.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
        "--cmdline",
        "action=soak soakms=20 soakdisk=on virtio=blk",
    ]);
    let steps = disk_steps(&mut vm, 3);
    let api = Client::new(&socket).with_timeout(Some(Duration::from_secs(30)));

    let first = api.counters().unwrap();
    assert_consistent(&first);
    let d = &first.disks[0];
    // The block test wrote 8 sectors and the last one, read both back and flushed; each soak
    // step (`steps` reported, one more may have begun) reads a sector, writes one, flushes.
    assert!(
        d.write_ops > steps && d.write_bytes >= 4096 + 512 + steps * 512,
        "{steps} steps: {d:?}"
    );
    assert!(
        d.read_ops > steps && d.read_bytes >= 4096 + 512 + steps * 512,
        "{steps} steps: {d:?}"
    );
    assert!(d.flush_ops > steps, "{steps} steps: {d:?}");
    // The boot vCPU printed through COM1 (port I/O) and drove virtio-mmio's registers.
    let v0 = &first.vcpus[0];
    assert!(v0.io_exits > 0 && v0.mmio_exits > 0, "{v0:?}");

    // More rounds: nothing goes down, the disk and the boot vCPU's exits go up.
    let later_steps = disk_steps(&mut vm, 3);
    let second = api.counters().unwrap();
    assert_consistent(&second);
    assert_not_below(&second, &first);
    let (d1, d2) = (&first.disks[0], &second.disks[0]);
    assert!(
        d2.write_ops > d1.write_ops && d2.read_ops > d1.read_ops && d2.flush_ops > d1.flush_ops,
        "steps {steps} -> {later_steps}: {d1:?} -> {d2:?}"
    );
    assert!(second.vcpus[0].exits > first.vcpus[0].exits);

    // Paused: the counters answer, and stay as they are (the vCPUs are parked; the guest's
    // last request completed long before the second read).
    api.pause().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let paused = api.counters().unwrap();
    assert_consistent(&paused);
    assert_not_below(&paused, &second);
    // Nothing in flight: every request counted with its bytes. The guest's requests are one
    // of 8 sectors each way (its block test), the rest of one sector.
    let d = &paused.disks[0];
    assert_eq!(d.write_bytes, 4096 + 512 * (d.write_ops - 1), "{d:?}");
    assert_eq!(d.read_bytes, 4096 + 512 * (d.read_ops - 1), "{d:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        api.counters().unwrap(),
        paused,
        "counters moved while paused"
    );
    // `vessel ctl counters` prints the same JSON.
    let o = ctl(&socket, &["counters"]);
    assert_code(&o, 0);
    let printed: VmCounters =
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert_eq!(printed, paused);
    let text = stdout(&o);
    for field in [
        "\"vcpus\"",
        "\"disks\"",
        "\"nics\"",
        "\"read_bytes\"",
        "\"io_exits\"",
    ] {
        assert!(text.contains(field), "{field} in {text}");
    }

    // Resumed: the guest goes on and so do the counters.
    api.resume().unwrap();
    disk_steps(&mut vm, 2);
    let resumed = api.counters().unwrap();
    assert_consistent(&resumed);
    assert_not_below(&resumed, &paused);
    assert!(resumed.disks[0].write_ops > paused.disks[0].write_ops);
    assert_eq!(vm.stop(), Some(143), "{}", vm.seen);
}
