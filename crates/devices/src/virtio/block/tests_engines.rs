//! Engine behaviour: requests in flight completing out of order, the in-flight cap, I/O errors
//! from the file, io_uring on guest memory, `O_DIRECT`, rate limits, engine choice and state.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use block::{DiskBackend, Format};
use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use super::engine::threads::ThreadPool;
use super::engine::uring::UringEngine;
use super::engine::{self, Completion, Data, Engine, EngineKind, Op, Sink};
use super::request::*;
use super::tests::{engines, rw_features, Driver, TestDisk};
use super::worker::BlockQueue;
use super::*;
use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use crate::virtio::queue::Segment;
use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, R, W};
use crate::virtio::VirtioDevice;

const DATA: u64 = 0x20000;
/// A stop flag never raised.
static NEVER: AtomicBool = AtomicBool::new(false);

/// A disk whose reads at offset 0 wait until the gate opens (no plain file: threads only).
struct GatedDisk {
    inner: Arc<TestDisk>,
    open: Mutex<bool>,
    cv: Condvar,
}

impl GatedDisk {
    fn new(size: usize) -> Arc<GatedDisk> {
        Arc::new(GatedDisk {
            inner: TestDisk::new(size, false),
            open: Mutex::new(false),
            cv: Condvar::new(),
        })
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

/// Opens the gate when dropped, so a failing assertion ends the test instead of leaving an I/O
/// thread parked at the gate while the pool waits to join it.
struct OpenOnDrop(Arc<GatedDisk>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl DiskBackend for GatedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> block::Result<()> {
        if off == 0 {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> block::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> block::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, off: u64, len: u64) -> block::Result<()> {
        self.inner.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> block::Result<()> {
        self.inner.write_zeroes(off, len)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn format(&self) -> Format {
        Format::Qcow2
    }
}

/// Process until `n` used entries are there (up to 5 s).
fn process_until(bq: &mut BlockQueue, d: &Driver, n: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    bq.process(&NEVER).unwrap();
    while d.tq.used_idx() != n {
        assert!(Instant::now() < deadline, "used index {}", d.tq.used_idx());
        bq.wait_completion();
        bq.process(&NEVER).unwrap();
    }
}

#[test]
fn requests_in_flight_complete_out_of_order() {
    let m = mem();
    let gated = GatedDisk::new(1 << 20);
    let disk: Arc<dyn DiskBackend> = gated.clone();
    let mut d = Driver::new(&m);
    let mut bq = d.block_queue_on(&disk, rw_features(), EngineKind::Threads, None);
    let _open = OpenOnDrop(gated.clone());
    // The first request waits at the gate; the two after it do not.
    let slow = d.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
    let fast1 = d.request(VIRTIO_BLK_T_IN, 8, &[(DATA + 0x1000, 512, W)]);
    let fast2 = d.request(VIRTIO_BLK_T_IN, 16, &[(DATA + 0x2000, 512, W)]);
    // The pool may finish the fast two before `process` returns, which then completes them.
    bq.process(&NEVER).unwrap();
    assert!(bq.in_flight() >= 1, "{} in flight", bq.in_flight());
    process_until(&mut bq, &d, 2);
    assert_eq!(bq.in_flight(), 1, "only the gated request is left");
    assert_eq!(d.status(slow), 0xff, "the gated request is still running");
    assert_eq!([d.status(fast1), d.status(fast2)], [VIRTIO_BLK_S_OK; 2]);
    assert_eq!(d.used_len(slow), None);
    gated.release();
    bq.run_to_idle().unwrap();
    assert_eq!(d.status(slow), VIRTIO_BLK_S_OK);
    // Its used entry came last.
    let head = |s| u32::from(d.head(s));
    assert_eq!(d.tq.used(2), (head(slow), 513));
    let mut first_two = [d.tq.used(0).0, d.tq.used(1).0];
    first_two.sort();
    assert_eq!(first_two, [head(fast1), head(fast2)]);
}

#[test]
fn in_flight_requests_are_capped_at_the_queue_size() {
    let m = mem();
    let gated = GatedDisk::new(1 << 20);
    let disk: Arc<dyn DiskBackend> = gated.clone();
    let mut d = Driver::with_size(&m, 8);
    let mut bq = d.block_queue_on(&disk, rw_features(), EngineKind::Threads, None);
    let _open = OpenOnDrop(gated.clone());
    // A guest making one chain available again and again.
    let status = d.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
    let head = d.head(status);
    for _ in 0..7 {
        d.tq.push_head(head);
    }
    bq.process(&NEVER).unwrap();
    assert_eq!(bq.in_flight(), 8);
    assert_eq!(bq.next_avail(), 8);
    for _ in 0..5 {
        d.tq.push_head(head);
    }
    bq.process(&NEVER).unwrap();
    assert_eq!(bq.in_flight(), 8, "no more than the queue size in flight");
    assert_eq!(bq.next_avail(), 8, "the others stay in the ring");
    gated.release();
    bq.run_to_idle().unwrap();
    assert_eq!(d.tq.used_idx(), 13);
    assert_eq!(d.status(status), VIRTIO_BLK_S_OK);
}

/// An engine that holds its operations until `go` is raised, then finishes them all when they
/// are next handed over (`flush_submissions`): between the end of a pass and its final reap.
struct HeldEngine {
    sink: Arc<Sink>,
    go: Arc<AtomicBool>,
    held: Vec<usize>,
}

impl Engine for HeldEngine {
    fn submit(&mut self, token: usize, _op: Op) {
        self.held.push(token);
    }
    fn flush_submissions(&mut self) {
        if self.go.load(Ordering::SeqCst) {
            for token in self.held.drain(..) {
                self.sink.post(Completion {
                    token,
                    result: Ok(()),
                });
            }
        }
    }
    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.sink.eventfd().as_raw_fd())
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.sink.drain(out);
    }
}

#[test]
fn slots_freed_at_the_end_of_a_full_pass_bring_the_worker_back() {
    let m = mem();
    let disk = TestDisk::new(1 << 20, false);
    let mut d = Driver::with_size(&m, 8);
    let (sink, go) = (Sink::new().unwrap(), Arc::new(AtomicBool::new(false)));
    let engine = HeldEngine {
        sink: sink.clone(),
        go: go.clone(),
        held: Vec::new(),
    };
    let parser = Parser::new(&*disk, rw_features(), super::tests::test_id());
    let mut bq = BlockQueue::new(
        d.tq.queue(),
        m.clone(),
        parser,
        Box::new(engine),
        None,
        Arc::default(),
    )
    .unwrap();
    // A guest that makes one chain available again and again: 8 fill the table, 5 wait.
    let status = d.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
    let head = d.head(status);
    for _ in 0..7 {
        d.tq.push_head(head);
    }
    bq.process(&NEVER).unwrap();
    for _ in 0..5 {
        d.tq.push_head(head);
    }
    // The next pass finds the table full; the 8 finish before its final reap.
    go.store(true, Ordering::SeqCst);
    // The worker's loop: it runs another pass when one says so or a completion is signalled
    // (the driver sends no notification: they are off while the device has work).
    for _ in 0..10 {
        let p = bq.process(&NEVER).unwrap();
        if !p.pending && sink.eventfd().read().is_err() {
            break;
        }
    }
    assert_eq!(
        d.tq.used_idx(),
        13,
        "chains left in the ring after a full pass"
    );
    assert_eq!(bq.in_flight(), 0);
}

#[test]
fn io_errors_from_the_file_are_ioerr() {
    for kind in engines() {
        let m = mem();
        let disk = TestDisk::new(1 << 20, false);
        let mut d = Driver::new(&m);
        let mut bq = d.block_queue(&disk, rw_features(), kind);
        // The file shrinks under the device: reads past its new end fail.
        std::fs::OpenOptions::new()
            .write(true)
            .open(disk.path())
            .unwrap()
            .set_len(4096)
            .unwrap();
        let short = d.request(VIRTIO_BLK_T_IN, 4, &[(DATA, 8192, W)]);
        let ok = d.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x10000, 4096, W)]);
        bq.run_to_idle().unwrap();
        assert_eq!(d.status(short), VIRTIO_BLK_S_IOERR, "{kind}");
        assert_eq!(d.used_len(short), Some(1), "{kind}");
        assert_eq!(d.status(ok), VIRTIO_BLK_S_OK, "{kind}");
        // The failed read is an error, not a read.
        let c = bq.counters();
        assert_eq!((c.read_ops, c.read_bytes, c.errors), (1, 4096, 1), "{kind}");
    }
    if engine::uring::available().is_err() {
        return;
    }
    // io_uring: an error code from the kernel (EBADF: the descriptor is read-only).
    let m = mem();
    let disk = TestDisk::with(1 << 20, false, false, true);
    let mut d = Driver::new(&m);
    let mut bq = d.block_queue(&disk, rw_features(), EngineKind::IoUring);
    let write = d.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
    let read = d.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x1000, 512, W)]);
    bq.run_to_idle().unwrap();
    assert_eq!(d.status(write), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.status(read), VIRTIO_BLK_S_OK);
}

fn uring_engine(disk: &Arc<TestDisk>, m: &GuestMem, depth: u16) -> UringEngine {
    let dynd: Arc<dyn DiskBackend> = disk.clone();
    let pool = ThreadPool::new(dynd, 2, "test").unwrap();
    UringEngine::new(disk.raw_file().unwrap(), m.clone(), pool, depth).unwrap()
}

fn reap_all(e: &mut UringEngine, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} completions",
            out.len()
        );
        if let Some(fd) = e.completion_fd() {
            engine::wait_readable(fd, Duration::from_millis(100));
        }
        e.reap(&mut out);
    }
    out
}

fn data(offset: u64, bufs: &[(u64, u32)]) -> Data {
    Data {
        offset,
        len: bufs.iter().map(|b| u64::from(b.1)).sum(),
        bufs: bufs
            .iter()
            .map(|&(a, l)| Segment {
                addr: GuestAddress(a),
                len: l,
                writable: true,
            })
            .collect(),
    }
}

#[test]
fn io_uring_moves_data_between_the_file_and_guest_memory() {
    if let Err(e) = engine::uring::available() {
        eprintln!("io_uring unavailable ({e}): skipped");
        return;
    }
    // Two regions, so a buffer can straddle host mappings.
    let m = GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20), (GuestAddress(2 << 20), 2 << 20)])
        .unwrap();
    for direct in [false, true] {
        let disk = TestDisk::with(1 << 20, false, direct, false);
        let mut e = uring_engine(&disk, &m, 16);
        // Eight reads in flight at once, of eight distinct sectors.
        let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 249) as u8).collect();
        std::fs::write(disk.path(), &pattern).unwrap();
        for t in 0..8u64 {
            e.submit(
                t as usize,
                Op::Read(data(t * 4096, &[(0x10000 + t * 4096, 4096)])),
            );
        }
        e.flush_submissions();
        assert_eq!(e.ring_in_flight(), 8, "direct={direct}");
        let done = reap_all(&mut e, 8);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        let mut got = vec![0u8; 8 * 4096];
        m.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert!(got == pattern[..8 * 4096], "direct={direct}");
        assert_eq!(e.pooled(), 0, "aligned requests stay on the ring");

        // A write across the two regions, then a flush.
        let across = (2 << 20) - 2048;
        m.write_slice(&[0x77; 4096], GuestAddress(across)).unwrap();
        e.submit(0, Op::Write(data(65536, &[(across, 4096)])));
        e.submit(1, Op::Flush);
        e.flush_submissions();
        let done = reap_all(&mut e, 2);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        assert!(disk.bytes(65536, 4096).iter().all(|&b| b == 0x77));
        assert_eq!(e.pooled(), 0);

        // A buffer O_DIRECT cannot use goes through the pool (and its aligned bounce buffer).
        e.submit(2, Op::Read(data(65536, &[(0x30001, 512)])));
        e.flush_submissions();
        let done = reap_all(&mut e, 1);
        assert!(done[0].result.is_ok());
        let mut b = [0u8; 512];
        m.read_slice(&mut b, GuestAddress(0x30001)).unwrap();
        assert!(b.iter().all(|&x| x == 0x77));
        assert_eq!(e.pooled(), u64::from(direct));

        // Dropped with operations in flight: the drop waits for them.
        m.write_slice(&[0u8; 8 * 4096], GuestAddress(0x10000))
            .unwrap();
        for t in 0..8u64 {
            e.submit(
                t as usize,
                Op::Read(data(t * 4096, &[(0x10000 + t * 4096, 4096)])),
            );
        }
        e.flush_submissions();
        drop(e);
        m.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert!(
            got == pattern[..8 * 4096],
            "direct={direct}: reads finished before the drop"
        );
    }
}

#[test]
fn cache_none_serves_unaligned_guest_buffers() {
    for kind in engines() {
        let m = mem();
        let disk = TestDisk::with(1 << 20, false, true, false);
        let mut d = Driver::new(&m);
        let mut bq = d.block_queue(&disk, rw_features(), kind);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
        m.write_slice(&pattern, GuestAddress(DATA + 3)).unwrap();
        // Unaligned in guest memory, over two descriptors; then one aligned.
        let out = d.request(
            VIRTIO_BLK_T_OUT,
            16,
            &[(DATA + 3, 1000, R), (DATA + 1003, 3096, R)],
        );
        m.write_slice(&pattern, GuestAddress(DATA + 0x4000))
            .unwrap();
        let out2 = d.request(VIRTIO_BLK_T_OUT, 32, &[(DATA + 0x4000, 4096, R)]);
        let flush = d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        bq.run_to_idle().unwrap();
        let inp = d.request(VIRTIO_BLK_T_IN, 16, &[(DATA + 0x10005, 4096, W)]);
        bq.run_to_idle().unwrap();
        assert_eq!(
            [out, out2, flush, inp].map(|s| d.status(s)),
            [VIRTIO_BLK_S_OK; 4],
            "{kind}"
        );
        assert_eq!(disk.bytes(16 * 512, 4096), pattern, "{kind}");
        assert_eq!(disk.bytes(32 * 512, 4096), pattern, "{kind}");
        let mut back = vec![0u8; 4096];
        m.read_slice(&mut back, GuestAddress(DATA + 0x10005))
            .unwrap();
        assert_eq!(back, pattern, "{kind}");
    }
}

fn ops_limit(size: u64, ms: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: ms,
        }),
    }
}

#[test]
fn rate_limits_delay_requests_which_wait_in_the_ring() {
    for kind in engines() {
        let m = mem();
        let disk = TestDisk::new(1 << 20, false);
        let dynd: Arc<dyn DiskBackend> = disk.clone();
        let mut d = Driver::new(&m);
        // 2 operations per 100 ms: 10 requests need 400 ms after the first two (tokens count
        // from the limiter's creation).
        let start = Instant::now();
        let mut bq = d.block_queue_on(&dynd, rw_features(), kind, Some(ops_limit(2, 100)));
        let reqs: Vec<u64> = (0..10)
            .map(|i| d.request(VIRTIO_BLK_T_IN, i, &[(DATA + i * 512, 512, W)]))
            .collect();
        bq.process(&NEVER).unwrap();
        assert_eq!(
            bq.next_avail(),
            2,
            "{kind}: refused requests stay in the ring"
        );
        bq.run_to_idle().unwrap();
        let t = start.elapsed();
        assert!(t >= Duration::from_millis(400), "{kind}: {t:?}");
        assert!(reqs.iter().all(|&s| d.status(s) == VIRTIO_BLK_S_OK));

        // Bandwidth: 16 KiB per 100 ms; four 16 KiB reads need 300 ms after the first.
        let mut d = Driver::new(&m);
        let bw = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 16 << 10,
                one_time_burst: 0,
                refill_time_ms: 100,
            }),
            ops: None,
        };
        let start = Instant::now();
        let mut bq = d.block_queue_on(&dynd, rw_features(), kind, Some(bw));
        for i in 0..4 {
            d.request(VIRTIO_BLK_T_IN, i * 32, &[(DATA + i * 0x4000, 16 << 10, W)]);
        }
        bq.run_to_idle().unwrap();
        let t = start.elapsed();
        assert!(t >= Duration::from_millis(300), "{kind}: {t:?}");
        assert_eq!(d.tq.used_idx(), 4);
    }
}

#[test]
fn one_limiter_paces_all_queues_and_wakes_each() {
    let m = mem();
    let disk = TestDisk::new(64 * 512, false);
    let start = Instant::now();
    let mut dev = Block::new(
        disk,
        BlockOptions {
            num_queues: 2,
            engine: EngineKind::Threads,
            rate_limit: ops_limit(1, 50),
            ..Default::default()
        },
    )
    .unwrap();
    dev.ack_features(rw_features());
    let mut d0 = Driver::new(&m);
    let tq1 = TestQueue::new_at(&m, 256, 0x100000);
    let (a0, k0) = super::tests::active_queue(&d0.tq, 0);
    let (a1, k1) = super::tests::active_queue(&tq1, 1);
    let int = Arc::new(CountingInterrupt::default());
    dev.activate(m.clone(), int, vec![a0, a1]).unwrap();
    let mut d1 = Driver::with_queue(&m, tq1, 100);
    for _ in 0..4 {
        d0.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        d1.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    k0.write(1).unwrap();
    k1.write(1).unwrap();
    d0.tq.wait_used(4);
    d1.tq.wait_used(4);
    // One operation per 50 ms for the device: 8 flushes take at least 350 ms.
    let t = start.elapsed();
    assert!(t >= Duration::from_millis(350), "{t:?}");
    dev.reset();
}

#[test]
fn engine_choice() {
    let raw = TestDisk::new(4096, false);
    let qcow: Arc<GatedDisk> = GatedDisk::new(4096);
    let r = |k, d: &dyn DiskBackend, u: Result<(), String>| engine::resolve(k, d, u);
    let no = || Err("no".to_string());
    assert_eq!(
        r(EngineKind::Auto, &*raw, Ok(())).unwrap(),
        EngineKind::IoUring
    );
    assert_eq!(
        r(EngineKind::Auto, &*raw, no()).unwrap(),
        EngineKind::Threads
    );
    assert_eq!(
        r(EngineKind::Auto, &*qcow, Ok(())).unwrap(),
        EngineKind::Threads
    );
    assert_eq!(
        r(EngineKind::Sync, &*raw, Ok(())).unwrap(),
        EngineKind::Sync
    );
    assert_eq!(
        r(EngineKind::Threads, &*raw, Ok(())).unwrap(),
        EngineKind::Threads
    );
    let e = r(EngineKind::IoUring, &*qcow, Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs a raw image") && e.contains("qcow2"),
        "{e}"
    );
    let e = r(EngineKind::IoUring, &*raw, no()).unwrap_err().to_string();
    assert!(e.contains("io_uring is unavailable: no"), "{e}");
    for (s, k) in [
        ("auto", EngineKind::Auto),
        ("io_uring", EngineKind::IoUring),
        ("threads", EngineKind::Threads),
        ("sync", EngineKind::Sync),
    ] {
        assert_eq!(s.parse::<EngineKind>(), Ok(k));
        assert_eq!(k.to_string(), s);
    }
    assert!("aio".parse::<EngineKind>().is_err());
    // A device refuses an engine it cannot have.
    let err = Block::new(
        qcow,
        BlockOptions {
            engine: EngineKind::IoUring,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, BlockError::Engine(_)), "{err}");
    let err = Block::new(
        raw,
        BlockOptions {
            rate_limit: ops_limit(0, 100),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, BlockError::RateLimit(_)), "{err}");
}

#[test]
fn block_state_has_the_engine_and_rate_limit() {
    use crate::virtio::DeviceSpecificState;
    let opts = BlockOptions {
        serial: "s1".into(),
        engine: EngineKind::Threads,
        rate_limit: ops_limit(100, 1000),
        ..Default::default()
    };
    let dev = Block::new(TestDisk::new(4096, false), opts.clone()).unwrap();
    let st = dev.device_state();
    let DeviceSpecificState::Block(b) = &st else {
        panic!("{st:?}");
    };
    assert_eq!(b.engine, EngineKind::Threads);
    assert_eq!(b.rate_limit, ops_limit(100, 1000));
    let json = serde_json::to_string(&st).unwrap();
    assert!(json.contains("\"engine\":\"threads\""), "{json}");
    assert_eq!(
        serde_json::from_str::<DeviceSpecificState>(&json).unwrap(),
        st
    );
    // A state saved before engines and limits existed still loads.
    let old: BlockState = serde_json::from_str(r#"{"serial":"s1"}"#).unwrap();
    assert_eq!(old.engine, EngineKind::Auto);
    assert!(old.rate_limit.is_unlimited());
    // A restored device takes the saved rate limit over.
    let mut again = Block::new(
        TestDisk::new(4096, false),
        BlockOptions {
            serial: "s1".into(),
            ..Default::default()
        },
    )
    .unwrap();
    again.restore_device_state(&st).unwrap();
    let DeviceSpecificState::Block(b2) = again.device_state() else {
        panic!()
    };
    assert_eq!(b2.rate_limit, ops_limit(100, 1000));
    let mut other = Block::new(TestDisk::new(4096, false), BlockOptions::default()).unwrap();
    assert!(other.restore_device_state(&st).is_err(), "another serial");
}

/// The guest pages whose dirty bit is set in `m`'s bitmaps (the VMM's writes).
fn vmm_dirty_pages(m: &GuestMem) -> Vec<u64> {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut out = Vec::new();
    for r in m.iter() {
        for p in 0..r.len() / 4096 {
            if r.bitmap().dirty_at((p * 4096) as usize) {
                out.push(r.start_addr().0 + p * 4096);
            }
        }
    }
    out
}

#[test]
fn every_engine_marks_the_pages_a_read_fills() {
    let mut cases: Vec<(EngineKind, bool)> =
        vec![(EngineKind::Sync, false), (EngineKind::Threads, false)];
    if engine::uring::available().is_ok() {
        // Straight into guest buffers through the ring, and (O_DIRECT, unaligned) through the
        // pool's bounce buffer.
        cases.push((EngineKind::IoUring, false));
        cases.push((EngineKind::IoUring, true));
    }
    for (kind, direct) in cases {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let disk = TestDisk::with(1 << 20, false, direct, false);
        std::fs::write(disk.path(), vec![0x5au8; 1 << 20]).unwrap();
        let dynd: Arc<dyn DiskBackend> = disk.clone();
        let pool = ThreadPool::new(dynd.clone(), 2, "test").unwrap();
        let mut e = engine::build(engine::EngineSetup {
            kind,
            disk: &dynd,
            mem: &m,
            pool: Some(&pool),
            depth: 8,
        })
        .unwrap();
        guestmem::clear_dirty(&m);
        // 6 KiB from the middle of page 0x21000 (unaligned: O_DIRECT bounces it), and a whole
        // page at 0x40000.
        let (bufs, offset) = if direct {
            (vec![(0x21800, 6144)], 4096)
        } else {
            (vec![(0x21800, 6144), (0x40000, 4096)], 0)
        };
        e.submit(3, Op::Read(data(offset, &bufs)));
        e.flush_submissions();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut done = Vec::new();
        while done.is_empty() {
            assert!(Instant::now() < deadline, "{kind} read did not complete");
            if let Some(fd) = e.completion_fd() {
                engine::wait_readable(fd, Duration::from_millis(100));
            }
            e.reap(&mut done);
        }
        assert!(done[0].result.is_ok(), "{kind}: {:?}", done[0].result);
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(0x22ffc)).unwrap();
        assert_eq!(b, [0x5a; 4], "{kind}: the read landed");
        let want: Vec<u64> = if direct {
            vec![0x21000, 0x22000]
        } else {
            vec![0x21000, 0x22000, 0x40000]
        };
        assert_eq!(vmm_dirty_pages(&m), want, "{kind} direct={direct}");
    }
}
