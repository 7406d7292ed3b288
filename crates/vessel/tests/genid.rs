//! The VM generation ID on the direct host: the bundled guest (`genid=ADDR`) prints the 16
//! bytes at the address the DSDT's `VGEN.ADDR` returns whenever they change. A restored
//! snapshot is a new generation (each clone its own); a live-migrated VM is the same one.

mod common;

use std::time::Duration;

use common::migration::TOKEN;
use common::soak::Console;
use common::*;

/// `arch::layout::VMGENID_ADDR`.
const GENID: &str = "genid=0xfe000";

/// The next `soak genid=HEX` line's ID.
fn next_genid(c: &mut Console) -> String {
    loop {
        let line = c.line(Duration::from_secs(60));
        assert!(!line.contains("MISMATCH"), "{}", c.seen);
        if let Some(id) = line.strip_prefix("soak genid=") {
            assert_eq!(id.len(), 32, "{line}");
            return id.to_string();
        }
    }
}

#[test]
fn generation_id_changes_on_every_restore_and_not_on_migration() {
    let tmp = TempDir::new("genid");
    let socket = tmp.file("api.sock");
    let dir = tmp.file("snap");
    let cmdline = format!("action=soak soakms=20 {GENID}");
    let mut vm = Console::spawn(&[
        "run",
        "--memory",
        "128M",
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    let g0 = next_genid(&mut vm);
    assert_ne!(g0, "0".repeat(32), "the VMM wrote an ID at boot");
    vm.soak_lines(1, 2);
    assert_code(
        &ctl(&socket, &["snapshot", "--dir", dir.to_str().unwrap()]),
        0,
    );

    // Two clones of one snapshot: each sees a new ID, and not the same one.
    let mut clones: Vec<Console> = (0..2)
        .map(|_| Console::spawn(&["run", "--restore", dir.to_str().unwrap()]))
        .collect();
    let ids: Vec<String> = clones.iter_mut().map(next_genid).collect();
    assert!(ids.iter().all(|g| *g != g0), "{g0} {ids:?}");
    assert_ne!(ids[0], ids[1]);
    for mut c in clones {
        c.soak_lines(1, 2);
        assert_eq!(c.stop(), Some(143));
    }

    // A live migration moves the same VM: its ID stays (no new line in the target's output).
    let target_api = tmp.file("target.sock");
    let mut target = Console::spawn(&["serve", "--api-socket", target_api.to_str().unwrap()]);
    wait_for(&target_api);
    let addr = format!("unix:{}", tmp.file("mig.sock").display());
    assert_code(
        &ctl(
            &target_api,
            &["migrate", "receive", "--token", TOKEN, "--listen", &addr],
        ),
        0,
    );
    let o = ctl(
        &socket,
        &["migrate", "send", "--token", TOKEN, "--to", &addr],
    );
    assert_code(&o, 0);
    assert_eq!(vm.child.wait().unwrap().code(), Some(0));
    // The guest checks its ID after every report line (each 20 ms).
    target.soak_lines(1, 10);
    assert!(!target.seen.contains("soak genid="), "{}", target.seen);
    assert_eq!(target.stop(), Some(143));
    assert!(!vm.seen.contains("MISMATCH"));
}
