//! Crash safety: kill -9 a writer at random points during allocating writes; afterwards
//! `vessel image check` and `qemu-img check` find no corruption (leaks are allowed, as in
//! QEMU) and every write acknowledged after a flush reads back.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: u64 = 20;

#[test]
fn kill_writer_at_random_points() {
    let d = tmp();
    let base = p(d.path(), "base.qcow2");
    let img = p(d.path(), "crash.qcow2");
    vessel(&["create", &base, "64M"]);
    qemu_io_or_skip(&base);
    vessel(&["clone", "--from", &base, &img]);
    let qemu = have_qemu();
    let mut rng = Rng(0xfeed);
    // Last acknowledged content per 4 KiB slot: (seed, write index).
    let mut acked: std::collections::HashMap<u64, (u64, u64)> = Default::default();
    let start = Instant::now();
    for round in 0..ROUNDS {
        let seed = round + 100;
        let mut child = Command::new(VESSEL)
            .args([
                "crash-writer",
                &img,
                "--seed",
                &seed.to_string(),
                "--count",
                "100000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let kill_after = Duration::from_millis(20 + rng.next() % 300);
        let t0 = Instant::now();
        let mut lines = BufReader::new(out).lines();
        let mut last_ack: Option<u64> = None;
        // Read acknowledgements until the deadline, then kill mid-stream.
        while t0.elapsed() < kill_after {
            match lines.next() {
                Some(Ok(l)) => {
                    let mut it = l.split_whitespace().map(|x| x.parse::<u64>().unwrap());
                    let (i, off) = (it.next().unwrap(), it.next().unwrap());
                    acked.insert(off, (seed, i));
                    last_ack = Some(i);
                }
                _ => break,
            }
        }
        child.kill().unwrap();
        // Lines already written to the pipe before the kill were acknowledged too.
        for l in lines.map_while(Result::ok) {
            let mut it = l.split_whitespace().map(|x| x.parse::<u64>().unwrap());
            let (i, off) = (it.next().unwrap(), it.next().unwrap());
            acked.insert(off, (seed, i));
            last_ack = Some(i);
        }
        child.wait().unwrap();
        // The one write after the last acknowledgement may or may not have landed.
        let next = last_ack.map_or(0, |i| i + 1);
        let size = 64 << 20;
        let inflight_off = block::cli::crash_offsets(seed, size)
            .nth(next as usize)
            .unwrap();
        let inflight = (inflight_off, (seed, next));
        let o = run(VESSEL, &["check", &img]);
        let code = o.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "round {round}: vessel check found corruption: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        if qemu {
            let o = run("qemu-img", &["check", &img]);
            let code = o.status.code();
            assert!(
                code == Some(0) || code == Some(3),
                "round {round}: qemu-img check: {}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        verify(&img, &mut acked, inflight, round);
        if code == Some(3) {
            vessel(&["check", "--repair", &img]);
        }
    }
    assert!(!acked.is_empty());
    eprintln!(
        "{ROUNDS} crash rounds, {} slots verified in {:?}",
        acked.len(),
        start.elapsed()
    );
}

fn qemu_io_or_skip(base: &str) {
    if have_qemu() {
        qemu_io(base, &["write -P 0x5c 0 8M"]);
    }
}

fn verify(
    img: &str,
    acked: &mut std::collections::HashMap<u64, (u64, u64)>,
    inflight: (u64, (u64, u64)),
    round: u64,
) {
    let disk = block::open(
        img,
        block::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut got = vec![0u8; 4096];
    let mut want = vec![0u8; 4096];
    for (&off, &(seed, i)) in acked.iter() {
        disk.read_at(&mut got, off).unwrap();
        block::cli::crash_pattern(seed, i, &mut want);
        if got != want && off == inflight.0 {
            continue; // checked below
        }
        assert!(
            got == want,
            "round {round}: acknowledged write {i} (seed {seed}) at {off:#x} lost"
        );
    }
    // If the in-flight write landed, it is the slot's content from now on.
    disk.read_at(&mut got, inflight.0).unwrap();
    let (seed, i) = inflight.1;
    block::cli::crash_pattern(seed, i, &mut want);
    if got == want {
        acked.insert(inflight.0, inflight.1);
    } else if let Some(&(s, j)) = acked.get(&inflight.0) {
        block::cli::crash_pattern(s, j, &mut want);
        assert!(
            got == want,
            "round {round}: slot {:#x} has neither old nor new data",
            inflight.0
        );
    }
}

/// The state a kill leaves right after a write that allocated a new L2 table, before any
/// flush: everything the writer wrote is in the file (as after SIGKILL, the page cache
/// keeps it), nothing it only cached. A reference to a cluster whose refcount is not on disk
/// yet would let the next writer hand that cluster out twice: it must never be there.
#[test]
fn a_kill_right_after_allocating_leaves_no_unrefcounted_cluster() {
    let d = tmp();
    for (i, off) in [0u64, 1 << 30, 3 << 30].into_iter().enumerate() {
        let img = p(d.path(), &format!("fresh{i}.qcow2"));
        vessel(&["create", &img, "4G"]);
        let disk = block::open(
            &img,
            block::OpenOptions {
                lock: false,
                ..Default::default()
            },
        )
        .unwrap();
        disk.write_at(&[0x5a; 4096], off).unwrap();
        // No flush, no drop: what SIGKILL leaves.
        std::mem::forget(disk);
        let report = block::ops::check(std::path::Path::new(&img), false).unwrap();
        assert_eq!(
            (report.corruptions, report.check_errors),
            (0, 0),
            "a write at {off:#x}: {:?}",
            report.messages
        );
    }
}
