//! virtio-balloon with the VMM's real discard path: pages the driver inflates leave the host's
//! resident memory and read back as zeroes. (The bundled guest has no balloon driver, so the
//! driver's side is played here, on guest memory built as the VMM builds it.)

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::{ActiveQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use guestmem::GuestMem;
use spec::cli::balloon as parse_balloon;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 64 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const PFNS: u64 = 0x10000;

#[derive(Default)]
struct Counter(AtomicU32);

impl VirtioInterrupt for Counter {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_needs_reset(&self) {
        panic!("device needs a reset");
    }
}

/// A ready queue at `base` (descriptor table, then available and used rings).
fn queue(mem: &GuestMem, base: u64) -> Queue {
    let zero = vec![0u8; 0x3000];
    mem.write_slice(&zero, GuestAddress(base + DESC)).unwrap();
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.try_set_desc_table_address(GuestAddress(base + DESC))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(base + AVAIL))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(base + USED))
        .unwrap();
    q.set_ready(true);
    q
}

/// Post one device-readable buffer as chain `n` (0-based) of the queue at `base`.
fn post(mem: &GuestMem, base: u64, n: u16, addr: u64, len: u32) {
    let d = base + DESC + 16 * u64::from(n);
    mem.write_obj(addr.to_le(), GuestAddress(d)).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(d + 8)).unwrap();
    mem.write_obj(0u32, GuestAddress(d + 12)).unwrap();
    mem.write_obj(n.to_le(), GuestAddress(base + AVAIL + 4 + 2 * u64::from(n)))
        .unwrap();
    mem.write_obj((n + 1).to_le(), GuestAddress(base + AVAIL + 2))
        .unwrap();
}

fn wait_used(mem: &GuestMem, base: u64, n: u16) {
    let start = Instant::now();
    while u16::from_le(mem.read_obj(GuestAddress(base + USED + 2)).unwrap()) != n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "queue not served"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Writes 0x5a to every page of `mem`, as a guest that used all of its memory.
fn use_all(mem: &GuestMem) {
    let page = [0x5au8; 4096];
    for p in 0..(MEM as u64 / 4096) {
        mem.write_slice(&page, GuestAddress(p * 4096)).unwrap();
    }
}

/// Activates the first `n` queues of `balloon`, one queue layout each, 0x40000 apart;
/// returns their kick eventfds.
fn activate(
    balloon: &mut dyn VirtioDevice,
    mem: &GuestMem,
    n: u16,
    int: Arc<Counter>,
) -> Vec<EventFd> {
    let mut kicks = Vec::new();
    let mut active = Vec::new();
    for i in 0..n {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        kicks.push(e.try_clone().unwrap());
        active.push(ActiveQueue {
            index: i,
            queue: queue(mem, 0x40000 * u64::from(i)),
            notifier: e,
        });
    }
    balloon.activate(mem.clone(), int, active).unwrap();
    kicks
}

/// Inflates 32 MiB through the inflate queue (at 0, kicked through `kick`): pages 16 MiB..48
/// MiB, in two chains of 4096 frame numbers (the lists at 1 MiB); returns once both are used.
fn inflate_16m_to_48m(mem: &GuestMem, kick: &EventFd) {
    let list = 1u64 << 20;
    for (k, first) in [(0u16, 0x1000u32), (1, 0x2000)] {
        let pfns: Vec<u8> = (first..first + 0x1000)
            .flat_map(|p| p.to_le_bytes())
            .collect();
        let at = list + PFNS * u64::from(k);
        mem.write_slice(&pfns, GuestAddress(at)).unwrap();
        post(mem, 0, k, at, pfns.len() as u32);
    }
    kick.write(1).unwrap();
    wait_used(mem, 0, 2);
}

fn rss(mem: &GuestMem) -> u64 {
    let host = hypervisor::mem::host_address(mem, GuestAddress(0)).unwrap();
    hypervisor::mem::resident_bytes_at(host).unwrap()
}

#[test]
fn inflating_gives_memory_back_to_the_host() {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // The guest has used all of its memory.
    use_all(&mem);
    let before = rss(&mem);
    assert!(before >= MEM as u64 - (1 << 20), "rss {before}");

    let cfg = parse_balloon("size=32M,free-page-reporting=on").unwrap();
    let (mut balloon, handle) = vmm::virtio::balloon_device(&cfg).unwrap();
    assert_eq!(handle.target(), 32 << 20);
    let mut c = [0u8; 4];
    balloon.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes(c), 8192, "num_pages");
    balloon.ack_features(balloon.features());
    // inflateq, deflateq, reporting_vq (no stats).
    let int = Arc::new(Counter::default());
    let kicks = activate(&mut balloon, &mem, 3, int.clone());
    inflate_16m_to_48m(&mem, &kicks[0]);
    balloon.write_config(4, &8192u32.to_le_bytes());
    assert_eq!(handle.actual(), 32 << 20);

    let after = rss(&mem);
    assert!(
        after + (30 << 20) <= before,
        "rss {} MiB -> {} MiB",
        before >> 20,
        after >> 20
    );
    let mut b = [0u8; 16];
    for at in [16u64 << 20, (32 << 20) + 123, (48 << 20) - 16] {
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        assert_eq!(b, [0; 16], "at {at:#x}");
    }
    mem.read_slice(&mut b, GuestAddress(48 << 20)).unwrap();
    assert_eq!(b, [0x5a; 16], "the page after the balloon is untouched");

    // Free page reporting: 8 MiB at 52 MiB is reported free and dropped as well.
    let base = 0x80000;
    let d = base + DESC;
    mem.write_obj((52u64 << 20).to_le(), GuestAddress(d))
        .unwrap();
    mem.write_obj((8u32 << 20).to_le(), GuestAddress(d + 8))
        .unwrap();
    mem.write_obj(2u16.to_le(), GuestAddress(d + 12)).unwrap(); // device-writable
    mem.write_obj(0u16, GuestAddress(base + AVAIL + 4)).unwrap();
    mem.write_obj(1u16.to_le(), GuestAddress(base + AVAIL + 2))
        .unwrap();
    kicks[2].write(1).unwrap();
    wait_used(&mem, base, 1);
    let reported = rss(&mem);
    assert!(reported + (7 << 20) <= after, "rss {after} -> {reported}");

    // A new target at run time reaches the config space with an interrupt.
    let ints = int.0.load(Ordering::SeqCst);
    handle.set_target(0);
    balloon.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes(c), 0);
    assert!(int.0.load(Ordering::SeqCst) > ints);
    balloon.reset();
}

#[test]
fn the_balloon_flag_and_its_errors() {
    let vessel = env!("CARGO_BIN_EXE_vessel");
    let run = |args: &[&str]| {
        std::process::Command::new(vessel)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    // The bundled guest has no balloon driver: the device is there and the guest still exits.
    let o = run(&["run", "--balloon", "--memory", "64M"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = run(&["run", "--balloon", "size=16M,stats=on", "--memory", "64M"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = run(&["run", "--balloon", "size=64M", "--memory", "64M"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("balloon.size: 64M is not below the guest memory of 64M"));
    let o = run(&["run", "--balloon", "colour=red"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid --balloon"));
}

/// The balloon over memory restored through userfaultfd: pages it inflates read as zeroes
/// afterwards, whether the pager had served them or not (never the snapshot's old contents),
/// and a snapshot taken then restores them as zeroes.
#[test]
fn inflating_uffd_restored_memory_gives_zeroes_and_snapshots_them() {
    use vmm::snapshot::memory::write_memory_unsynced;
    use vmm::snapshot::pager::Pager;
    let dir = std::env::temp_dir().join(format!("vessel-balloon-uffd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = |mem: &GuestMem, name: &str| {
        let p = dir.join(name);
        let (regions, _, u) = write_memory_unsynced(mem, &p).unwrap();
        u.finish().unwrap();
        (p, regions)
    };
    // The saved guest had used all of its memory.
    let orig = GuestMem::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    use_all(&orig);
    let (file, regions) = snap(&orig, "memory");
    drop(orig);
    let (mem, pager) = Pager::start(std::slice::from_ref(&file), &regions).unwrap();
    // Served before the inflation: 20 MiB.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(20 << 20)).unwrap(), 0x5a);

    let cfg = parse_balloon("size=32M").unwrap();
    let (mut balloon, _handle) = vmm::virtio::balloon_device(&cfg).unwrap();
    balloon.ack_features(balloon.features());
    let kicks = activate(&mut balloon, &mem, 2, Arc::new(Counter::default()));
    inflate_16m_to_48m(&mem, &kicks[0]);
    let mut b = [0u8; 16];
    for at in [16u64 << 20, 20 << 20, (32 << 20) + 123, (48 << 20) - 16] {
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        assert_eq!(b, [0; 16], "at {at:#x}");
    }
    mem.read_slice(&mut b, GuestAddress(48 << 20)).unwrap();
    assert_eq!(b, [0x5a; 16], "the page after the balloon");
    // (The pager counts a discard just after letting it proceed.)
    let start = Instant::now();
    while pager.stats().removed_pages < 8192 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(pager.stats().removed_pages, 8192, "{}", pager.stats());
    balloon.reset();

    // Snapshot now (what the pager never served comes in first): the balloon's pages are holes
    // and restore as zeroes.
    pager.populate().unwrap();
    let (file2, regions2) = snap(&mem, "memory2");
    drop(pager);
    let (again, _pager2) = Pager::start(std::slice::from_ref(&file2), &regions2).unwrap();
    for (at, want) in [
        (16u64 << 20, 0),
        (30 << 20, 0),
        (48 << 20, 0x5a),
        (60 << 20, 0x5a),
    ] {
        again.read_slice(&mut b, GuestAddress(at)).unwrap();
        assert_eq!(b, [want; 16], "at {at:#x}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
