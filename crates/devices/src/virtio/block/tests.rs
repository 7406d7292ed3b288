//! virtio-blk tests: requests driven through queues in guest memory, as a driver would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use block::raw::RawBackend;
use block::{DiskBackend, Format};
use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::engine::threads::ThreadPool;
use super::engine::EngineSetup;
use super::request::*;
use super::worker::BlockQueue;
use super::*;
use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, R, W};
use crate::virtio::{has_feature, VirtioDevice};

/// A disk image in a temporary file (so that every engine, io_uring included, can serve it),
/// counting the flushes and discards that reach it as a backend.
pub(super) struct TestDisk {
    _dir: tempfile::TempDir,
    path: PathBuf,
    inner: RawBackend,
    pub flushes: AtomicU32,
    pub discards: Mutex<Vec<(u64, u64)>>,
    /// `raw_file` hands out a read-only descriptor: writes through io_uring fail (EBADF).
    bad_fd: bool,
}

impl TestDisk {
    pub fn new(size: usize, ro: bool) -> Arc<TestDisk> {
        Self::with(size, ro, false, false)
    }

    pub fn with(size: usize, ro: bool, direct: bool, bad_fd: bool) -> Arc<TestDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; size]).unwrap();
        let inner = RawBackend::open_with(&path, ro, direct).unwrap();
        Arc::new(TestDisk {
            _dir: dir,
            path,
            inner,
            flushes: AtomicU32::new(0),
            discards: Mutex::new(Vec::new()),
            bad_fd,
        })
    }

    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()[off..off + len].to_vec()
    }

    pub fn fill(&self, byte: u8) {
        let len = std::fs::metadata(&self.path).unwrap().len() as usize;
        std::fs::write(&self.path, vec![byte; len]).unwrap();
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl DiskBackend for TestDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> block::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> block::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> block::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, off: u64, len: u64) -> block::Result<()> {
        self.discards.lock().unwrap().push((off, len));
        self.inner.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> block::Result<()> {
        self.inner.write_zeroes(off, len)
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn raw_file(&self) -> Option<block::RawFile> {
        if self.bad_fd {
            return Some(block::RawFile {
                file: std::fs::File::open(&self.path).ok()?,
                direct: false,
                align: 1,
                flush: true,
            });
        }
        self.inner.raw_file()
    }
}

/// The engines to test every request with (io_uring only where the host has it).
pub(super) fn engines() -> Vec<EngineKind> {
    let mut v = vec![EngineKind::Sync, EngineKind::Threads];
    match engine::uring::available() {
        Ok(()) => v.push(EngineKind::IoUring),
        Err(e) => eprintln!("io_uring unavailable ({e}): not tested"),
    }
    v
}

/// Whether guest flushes reach `DiskBackend::flush` (io_uring fsyncs the file itself).
fn counts_flushes(kind: EngineKind) -> bool {
    kind != EngineKind::IoUring
}

const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x80000;

/// A driver building requests: each request gets its own header and status slot.
pub(super) struct Driver<'a> {
    pub m: &'a GuestMem,
    pub tq: TestQueue<'a>,
    pub n: u64,
    /// Head of the request whose status byte is at each address.
    heads: HashMap<u64, u16>,
}

impl<'a> Driver<'a> {
    pub fn new(m: &'a GuestMem) -> Self {
        Self::with_size(m, 256)
    }

    pub fn with_size(m: &'a GuestMem, size: u16) -> Self {
        Driver {
            m,
            tq: TestQueue::new(m, size),
            n: 0,
            heads: HashMap::new(),
        }
    }

    /// A queue for this driver's rings, served by `kind` on `disk` (a fresh thread pool).
    pub fn block_queue(&self, disk: &Arc<TestDisk>, features: u64, kind: EngineKind) -> BlockQueue {
        let disk: Arc<dyn DiskBackend> = disk.clone();
        self.block_queue_on(&disk, features, kind, None)
    }

    /// [`Driver::block_queue`] on any backend, with an optional rate limit.
    pub fn block_queue_on(
        &self,
        disk: &Arc<dyn DiskBackend>,
        features: u64,
        kind: EngineKind,
        limit: Option<crate::rate_limiter::RateLimiterConfig>,
    ) -> BlockQueue {
        let pool = ThreadPool::new(disk.clone(), 2, "test").unwrap();
        let engine = engine::build(EngineSetup {
            kind,
            disk,
            mem: self.m,
            pool: Some(&pool),
            depth: self.tq.size,
        })
        .unwrap();
        let limiter = limit.and_then(|l| crate::rate_limiter::SharedLimiter::new(l).unwrap());
        BlockQueue::new(
            self.tq.queue(),
            self.m.clone(),
            Parser::new(&**disk, features, test_id()),
            engine,
            limiter,
            Arc::default(),
        )
        .unwrap()
    }

    /// A driver for an existing queue, numbering its slots from `n`.
    pub fn with_queue(m: &'a GuestMem, tq: TestQueue<'a>, n: u64) -> Self {
        Driver {
            m,
            tq,
            n,
            heads: HashMap::new(),
        }
    }

    /// Head of the request whose status byte is at `status`.
    pub fn head(&self, status: u64) -> u16 {
        self.heads[&status]
    }

    /// Used length of the request whose status byte is at `status` (its last used entry).
    pub fn used_len(&self, status: u64) -> Option<u32> {
        let head = u32::from(*self.heads.get(&status)?);
        (0..self.tq.used_idx())
            .rev()
            .map(|i| self.tq.used(i))
            .find(|(id, _)| *id == head)
            .map(|(_, len)| len)
    }

    /// Write a header for request `n`; returns its address.
    pub fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = HDR + 16 * self.n;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.m.write_slice(&h, GuestAddress(at)).unwrap();
        at
    }

    pub fn status_slot(&mut self) -> u64 {
        let at = STATUS + self.n;
        self.m.write_obj(0xffu8, GuestAddress(at)).unwrap();
        self.n += 1;
        at
    }

    /// A request: header, `data` buffers, status byte. Returns the status address.
    pub fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> u64 {
        let h = self.header(kind, sector);
        let s = self.status_slot();
        let mut descs = vec![(h, 16, R)];
        descs.extend_from_slice(data);
        descs.push((s, 1, W));
        let head = self.tq.add_chain(&descs);
        self.heads.insert(s, head);
        s
    }

    /// Record that the chain at `head` reports its status at `status`.
    fn track(&mut self, status: u64, head: u16) {
        self.heads.insert(status, head);
    }

    pub fn status(&self, at: u64) -> u8 {
        self.m.read_obj(GuestAddress(at)).unwrap()
    }
}

pub(super) fn test_id() -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    id[..13].copy_from_slice(b"vessel-serial");
    id
}

/// Serve what the driver made available until nothing is in flight.
fn run(bq: &mut BlockQueue) {
    bq.run_to_idle().unwrap();
}

pub(super) fn rw_features() -> u64 {
    feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_BLK_F_FLUSH)
        | feature(VIRTIO_BLK_F_DISCARD)
        | feature(VIRTIO_BLK_F_WRITE_ZEROES)
}

#[test]
fn config_and_features() {
    let disk = TestDisk::new(1 << 20, false);
    let dev = Block::new(
        disk.clone(),
        BlockOptions {
            serial: "x".into(),
            num_queues: 2,
            queue_size: 128,
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 2048);
    let mut b4 = [0u8; 4];
    dev.read_config(12, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 126);
    dev.read_config(20, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 512);
    let mut b2 = [0u8; 2];
    dev.read_config(34, &mut b2);
    assert_eq!(u16::from_le_bytes(b2), 2);
    dev.read_config(40, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), MAX_DISCARD_SEGMENTS);
    let f = dev.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert!(has_feature(f, bit), "bit {bit}");
    }
    assert!(!has_feature(f, VIRTIO_BLK_F_RO));
    assert_eq!(dev.queue_max_sizes(), &[128, 128]);

    let ro = Block::new(TestDisk::new(4096, true), BlockOptions::default()).unwrap();
    assert!(has_feature(ro.features(), VIRTIO_BLK_F_RO));
    assert!(!has_feature(ro.features(), VIRTIO_BLK_F_DISCARD));
    assert!(!has_feature(ro.features(), VIRTIO_BLK_F_MQ));

    let bad = |o: BlockOptions| Block::new(disk.clone(), o).err();
    assert_eq!(
        bad(BlockOptions {
            num_queues: 0,
            ..Default::default()
        }),
        Some(BlockError::NumQueues(0))
    );
    assert_eq!(
        bad(BlockOptions {
            queue_size: 100,
            ..Default::default()
        }),
        Some(BlockError::QueueSize(100))
    );
    assert!(bad(BlockOptions {
        serial: "x".repeat(21),
        ..Default::default()
    })
    .is_some());
}

#[test]
fn a_driver_without_flush_gets_write_through() {
    for kind in engines() {
        let m = mem();
        let disk = TestDisk::new(1 << 20, false);
        let mut d = Driver::new(&m);
        let features = rw_features() & !feature(VIRTIO_BLK_F_FLUSH);
        let mut bq = d.block_queue(&disk, features, kind);
        m.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
        let out = d.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
        run(&mut bq);
        assert_eq!(d.status(out), VIRTIO_BLK_S_OK, "{kind}");
        assert_eq!(disk.bytes(0, 512), vec![7u8; 512], "{kind}");
        // Each write reached stable storage before it completed (every engine flushes
        // through the backend on this path).
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 1, "{kind}");
    }
}

#[test]
fn write_read_flush_get_id() {
    for kind in engines() {
        let m = mem();
        let disk = TestDisk::new(1 << 20, false);
        let mut d = Driver::new(&m);
        let mut bq = d.block_queue(&disk, rw_features(), kind);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
        m.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        // OUT of 1024 bytes at sector 2, over two descriptors; FLUSH; GET_ID.
        let out = d.request(VIRTIO_BLK_T_OUT, 2, &[(DATA, 300, R), (DATA + 300, 724, R)]);
        let flush = d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        let id = d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x20000, 20, W)]);
        run(&mut bq);
        // IN of 1024 bytes back, over three descriptors, into another buffer (after the write
        // completed: requests in flight together are not ordered).
        let back = DATA + 0x10000;
        let inp = d.request(
            VIRTIO_BLK_T_IN,
            2,
            &[(back, 512, W), (back + 512, 12, W), (back + 524, 500, W)],
        );
        run(&mut bq);
        assert_eq!(
            [out, inp, flush, id].map(|s| d.status(s)),
            [VIRTIO_BLK_S_OK; 4],
            "{kind}"
        );
        assert_eq!(disk.bytes(1024, 1024), pattern, "{kind}");
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(back)).unwrap();
        assert_eq!(got, pattern, "{kind}");
        if counts_flushes(kind) {
            assert_eq!(disk.flushes.load(Ordering::SeqCst), 1, "{kind}");
        }
        let mut serial = [0u8; 20];
        m.read_slice(&mut serial, GuestAddress(DATA + 0x20000))
            .unwrap();
        assert_eq!(&serial[..13], b"vessel-serial");
        assert_eq!(&serial[13..], &[0; 7]);
        // Used lengths: bytes written including the status byte.
        assert_eq!(
            [out, inp, flush, id].map(|s| d.used_len(s)),
            [Some(1), Some(1025), Some(1), Some(21)],
            "{kind}"
        );
        // Counted: one of each, the data bytes (GET_ID is neither I/O nor an error).
        assert_eq!(
            bq.counters(),
            BlockCountersSnapshot {
                read_ops: 1,
                read_bytes: 1024,
                write_ops: 1,
                write_bytes: 1024,
                flush_ops: 1,
                ..Default::default()
            },
            "{kind}"
        );
    }
}

#[test]
fn large_transfers_go_through_the_bounce_buffer_in_pieces() {
    for kind in engines() {
        let m = mem();
        let disk = TestDisk::new(4 << 20, false);
        let mut d = Driver::new(&m);
        let mut bq = d.block_queue(&disk, rw_features(), kind);
        let len = 600 * 1024;
        let pattern: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0x100000)).unwrap();
        let out = d.request(VIRTIO_BLK_T_OUT, 8, &[(0x100000, len as u32, R)]);
        run(&mut bq);
        let inp = d.request(VIRTIO_BLK_T_IN, 8, &[(0x200000, len as u32, W)]);
        run(&mut bq);
        assert_eq!(
            [d.status(out), d.status(inp)],
            [VIRTIO_BLK_S_OK; 2],
            "{kind}"
        );
        let mut got = vec![0u8; len];
        m.read_slice(&mut got, GuestAddress(0x200000)).unwrap();
        assert!(got == pattern, "{kind}");
    }
}

fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn discard_and_write_zeroes() {
    for kind in engines() {
        discard_and_write_zeroes_with(kind);
    }
}

fn discard_and_write_zeroes_with(kind: EngineKind) {
    let m = mem();
    let disk = TestDisk::new(64 * 512, false);
    disk.fill(0xaa);
    let mut d = Driver::new(&m);
    let mut bq = d.block_queue(&disk, rw_features(), kind);
    let seg = |m: &GuestMem, at: u64, segs: &[[u8; 16]]| {
        for (i, s) in segs.iter().enumerate() {
            m.write_slice(s, GuestAddress(at + 16 * i as u64)).unwrap();
        }
        (at, 16 * segs.len() as u32, R)
    };
    let a = seg(&m, DATA, &[segment(0, 8, 0), segment(16, 2, 0)]);
    let discard = d.request(VIRTIO_BLK_T_DISCARD, 0, &[a]);
    let b = seg(
        &m,
        DATA + 0x100,
        &[segment(8, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
    );
    let zeroes = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[b]);
    let c = seg(&m, DATA + 0x200, &[segment(20, 1, 1)]);
    let discard_unmap = d.request(VIRTIO_BLK_T_DISCARD, 0, &[c]);
    let e = seg(&m, DATA + 0x300, &[segment(20, 1, 2)]);
    let zeroes_reserved = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[e]);
    let many: Vec<[u8; 16]> = (0..17).map(|i| segment(i, 1, 0)).collect();
    let f = seg(&m, DATA + 0x400, &many);
    let too_many = d.request(VIRTIO_BLK_T_DISCARD, 0, &[f]);
    // The second segment is past the end: nothing is discarded, not even the first.
    let g = seg(&m, DATA + 0x800, &[segment(30, 1, 0), segment(63, 2, 0)]);
    let past_end = d.request(VIRTIO_BLK_T_DISCARD, 0, &[g]);
    let k = seg(&m, DATA + 0x900, &[segment(0, MAX_DISCARD_SECTORS + 1, 0)]);
    let too_big = d.request(VIRTIO_BLK_T_DISCARD, 0, &[k]);
    let odd = d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 20, R)]);
    run(&mut bq);
    assert_eq!(d.status(discard), VIRTIO_BLK_S_OK);
    assert_eq!(d.status(zeroes), VIRTIO_BLK_S_OK);
    assert_eq!(d.status(discard_unmap), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(d.status(zeroes_reserved), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(d.status(too_many), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.status(past_end), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.status(too_big), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.status(odd), VIRTIO_BLK_S_IOERR);
    assert_eq!(
        *disk.discards.lock().unwrap(),
        vec![(0, 8 * 512), (16 * 512, 2 * 512)]
    );
    let data = disk.bytes(0, 64 * 512);
    assert!(data[..12 * 512].iter().all(|&b| b == 0));
    assert!(data[12 * 512..16 * 512].iter().all(|&b| b == 0xaa));
    assert!(data[16 * 512..18 * 512].iter().all(|&b| b == 0));
    assert!(data[18 * 512..].iter().all(|&b| b == 0xaa));
    // One discard and one write-zeroes served; the six refused ones are errors.
    assert_eq!(
        bq.counters(),
        BlockCountersSnapshot {
            discard_ops: 1,
            write_zeroes_ops: 1,
            errors: 6,
            ..Default::default()
        },
        "{kind}"
    );

    // Not negotiated: unsupported.
    let mut d = Driver::new(&m);
    let mut bq = d.block_queue(&disk, feature(VIRTIO_F_VERSION_1), kind);
    let a = seg(&m, DATA, &[segment(40, 1, 0)]);
    let s1 = d.request(VIRTIO_BLK_T_DISCARD, 0, &[a]);
    let s2 = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[a]);
    run(&mut bq);
    assert_eq!([d.status(s1), d.status(s2)], [VIRTIO_BLK_S_UNSUPP; 2]);
}

#[test]
fn read_only_refuses_writes() {
    for kind in engines() {
        let m = mem();
        let disk = TestDisk::new(64 * 512, true);
        disk.fill(0x55);
        let mut d = Driver::new(&m);
        let mut bq = d.block_queue(&disk, rw_features(), kind);
        let out = d.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
        m.write_slice(&segment(0, 1, 0), GuestAddress(DATA + 0x1000))
            .unwrap();
        let discard = d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA + 0x1000, 16, R)]);
        let zero = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA + 0x1000, 16, R)]);
        let inp = d.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x2000, 512, W)]);
        let flush = d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        run(&mut bq);
        assert_eq!(
            [out, discard, zero].map(|s| d.status(s)),
            [VIRTIO_BLK_S_IOERR; 3],
            "{kind}"
        );
        assert_eq!(
            [d.status(inp), d.status(flush)],
            [VIRTIO_BLK_S_OK; 2],
            "{kind}"
        );
        assert!(disk.bytes(0, 64 * 512).iter().all(|&b| b == 0x55), "{kind}");
    }
}

#[test]
fn out_of_range_unaligned_and_unsupported() {
    for kind in engines() {
        let m = mem();
        let disk = TestDisk::new(64 * 512 + 100, false);
        let mut d = Driver::new(&m);
        let mut bq = d.block_queue(&disk, rw_features(), kind);
        let last = d.request(VIRTIO_BLK_T_IN, 63, &[(DATA, 512, W)]);
        let past = d.request(VIRTIO_BLK_T_IN, 63, &[(DATA, 1024, W)]);
        let beyond = d.request(VIRTIO_BLK_T_OUT, 64, &[(DATA, 512, R)]);
        let huge = d.request(VIRTIO_BLK_T_IN, u64::MAX, &[(DATA, 512, W)]);
        let huge2 = d.request(VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1, &[(DATA, 512, R)]);
        let odd = d.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, W)]);
        let unsupp = d.request(99, 0, &[]);
        let scsi = d.request(2, 0, &[(DATA, 512, W)]);
        run(&mut bq);
        assert_eq!(d.status(last), VIRTIO_BLK_S_OK, "{kind}");
        for s in [past, beyond, huge, huge2, odd] {
            assert_eq!(d.status(s), VIRTIO_BLK_S_IOERR, "{kind}: status at {s:#x}");
        }
        assert_eq!(d.status(unsupp), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(d.status(scsi), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(d.tq.used_idx(), 8);
        let c = bq.counters();
        assert_eq!(
            (c.read_ops, c.read_bytes, c.write_ops, c.errors),
            (1, 512, 0, 7),
            "{kind}"
        );
    }
}

#[test]
fn malformed_chains_fail_alone() {
    for kind in engines() {
        malformed_chains_fail_alone_with(kind);
    }
}

fn malformed_chains_fail_alone_with(kind: EngineKind) {
    let m = mem();
    let disk = TestDisk::new(64 * 512, false);
    let mut d = Driver::new(&m);
    let mut bq = d.block_queue(&disk, rw_features(), kind);
    let mut expect: Vec<(u64, Option<u8>)> = Vec::new();
    let good = |d: &mut Driver, expect: &mut Vec<(u64, Option<u8>)>| {
        let s = d.request(VIRTIO_BLK_T_IN, 1, &[(DATA + 0x8000, 512, W)]);
        expect.push((s, Some(VIRTIO_BLK_S_OK)));
    };

    // A loop: header -> status -> header. The status byte was reached: IOERR.
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let s = d.status_slot();
    // add_raw restarts at descriptor 0; use it first.
    let head = d.tq.add_raw(&[(hdr, 16, R | 1, 1), (s, 1, W | 1, 0)]);
    d.track(s, head);
    expect.push((s, Some(VIRTIO_BLK_S_IOERR)));
    good(&mut d, &mut expect);

    // Data outside guest memory.
    let s = d.request(VIRTIO_BLK_T_IN, 0, &[(0x7_0000_0000, 512, W)]);
    expect.push((s, Some(VIRTIO_BLK_S_IOERR)));
    // Data whose address range wraps.
    let s = d.request(VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 100, 512, W)]);
    expect.push((s, Some(VIRTIO_BLK_S_IOERR)));
    good(&mut d, &mut expect);

    // Header device-writable.
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let s = d.status_slot();
    let head = d.tq.add_chain(&[(hdr, 16, W), (DATA, 512, W), (s, 1, W)]);
    d.track(s, head);
    expect.push((s, Some(VIRTIO_BLK_S_IOERR)));
    // Status byte device-readable: nothing can be reported, nothing is done.
    let hdr = d.header(VIRTIO_BLK_T_OUT, 0);
    let s = d.status_slot();
    let head = d.tq.add_chain(&[(hdr, 16, R), (DATA, 512, R), (s, 1, R)]);
    d.track(s, head);
    expect.push((s, None));
    // Zero-length status.
    let hdr = d.header(VIRTIO_BLK_T_FLUSH, 0);
    let s = d.status_slot();
    let head = d.tq.add_chain(&[(hdr, 16, R), (s, 0, W)]);
    d.track(s, head);
    expect.push((s, None));
    // Readable data after writable data.
    let hdr = d.header(VIRTIO_BLK_T_OUT, 0);
    let s = d.status_slot();
    let head =
        d.tq.add_chain(&[(hdr, 16, R), (DATA, 1, W), (DATA, 512, R), (s, 1, W)]);
    d.track(s, head);
    expect.push((s, Some(VIRTIO_BLK_S_IOERR)));
    good(&mut d, &mut expect);

    // Too many descriptors: an indirect table of SEG_MAX + 3.
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let s = d.status_slot();
    let mut descs = vec![(hdr, 16, R)];
    descs.extend((0..=SEG_MAX).map(|i| (DATA + 512 * u64::from(i), 512, W)));
    descs.push((s, 1, W));
    let head = d.tq.add_indirect(&descs, 0x60000);
    d.track(s, head);
    expect.push((s, Some(VIRTIO_BLK_S_IOERR)));
    // An indirect table longer than any chain may be: walk refused, unserved.
    let s = d.status_slot();
    let big: Vec<_> = (0..300).map(|_| (hdr, 16, R)).collect();
    let head = d.tq.add_indirect(&big, 0x70000);
    d.track(s, head);
    expect.push((s, None));
    // Header too short.
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let s = d.status_slot();
    let head = d.tq.add_chain(&[(hdr, 8, R), (s, 1, W)]);
    d.track(s, head);
    expect.push((s, Some(VIRTIO_BLK_S_IOERR)));
    good(&mut d, &mut expect);

    run(&mut bq);
    for (i, (s, want)) in expect.iter().enumerate() {
        let got = d.status(*s);
        match want {
            Some(w) => assert_eq!(got, *w, "{kind}: request {i}"),
            None => {
                assert_eq!(got, 0xff, "{kind}: request {i} must stay untouched");
                // Unserved chains have a used length of 0.
                assert_eq!(d.used_len(*s), Some(0), "{kind}: request {i}");
            }
        }
    }
    assert_eq!(usize::from(d.tq.used_idx()), expect.len());
    // Nothing was written to the disk by the bad OUT.
    assert!(disk.bytes(0, 512).iter().all(|&b| b == 0));
}

#[test]
fn lengths_that_overflow_get_ioerr() {
    // 2.25 GiB of reserved (untouched) guest memory, used twice by one chain.
    let big = 0x9000_0000u64;
    let m = GuestMem::from_ranges(&[(GuestAddress(0), big as usize)]).unwrap();
    for kind in engines() {
        let disk = TestDisk::new(64 * 512, false);
        let mut d = Driver::new(&m);
        let mut bq = d.block_queue(&disk, rw_features(), kind);
        let len = (big - 0x100000) as u32;
        let s = d.request(
            VIRTIO_BLK_T_IN,
            0,
            &[(0x100000, len, W), (0x100000, len, W)],
        );
        run(&mut bq);
        assert_eq!(d.status(s), VIRTIO_BLK_S_IOERR, "{kind}");
    }
}

pub(super) fn active_queue(tq: &TestQueue, index: u16) -> (ActiveQueue, EventFd) {
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = evt.try_clone().unwrap();
    (
        ActiveQueue {
            index,
            queue: tq.queue(),
            notifier: evt,
        },
        kick,
    )
}

fn options(num_queues: u16, engine: EngineKind) -> BlockOptions {
    BlockOptions {
        num_queues,
        engine,
        ..Default::default()
    }
}

#[test]
fn multiqueue_workers_serve_and_corruption_needs_reset() {
    for kind in engines() {
        multiqueue_with(kind);
    }
}

fn multiqueue_with(kind: EngineKind) {
    let m = mem();
    let disk = TestDisk::new(64 * 512, false);
    let mut dev = Block::new(disk.clone(), options(2, kind)).unwrap();
    assert_eq!(dev.engine(), kind);
    dev.ack_features(rw_features());
    let mut d0 = Driver::new(&m);
    let tq1 = TestQueue::new_at(&m, 256, 0x100000);
    let (a0, k0) = active_queue(&d0.tq, 0);
    let (a1, k1) = active_queue(&tq1, 1);
    let int = Arc::new(CountingInterrupt::default());
    dev.activate(m.clone(), int.clone(), vec![a0, a1]).unwrap();
    assert!(matches!(
        dev.activate(m.clone(), int.clone(), vec![]),
        Err(ActivateError::AlreadyActive)
    ));

    let s0 = d0.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    k0.write(1).unwrap();
    d0.tq.wait_used(1);
    assert_eq!(d0.status(s0), VIRTIO_BLK_S_OK);

    // Queue 1: a header and status by hand.
    let mut d1 = Driver::with_queue(&m, tq1, 100);
    let s1 = d1.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    k1.write(1).unwrap();
    d1.tq.wait_used(1);
    assert_eq!(d1.status(s1), VIRTIO_BLK_S_OK);
    if counts_flushes(kind) {
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 2);
    }
    let states = dev.queue_states();
    assert_eq!(states.len(), 2);
    assert!(states.iter().all(|(_, s)| s.next_used == 1));
    // Both queues count into the device's counters.
    let counters = dev.counters();
    assert_eq!(counters.snapshot().flush_ops, 2);

    // Corrupt queue 1's available index: NEEDS_RESET; queue 0 keeps working.
    d1.tq.set_avail_idx(1000);
    k1.write(1).unwrap();
    let start = std::time::Instant::now();
    while !*int.needs_reset.lock().unwrap() {
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let s0 = d0.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    k0.write(1).unwrap();
    d0.tq.wait_used(2);
    assert_eq!(d0.status(s0), VIRTIO_BLK_S_OK);

    dev.reset();
    assert!(dev.queue_states().is_empty());
    assert_eq!(dev.acked_features(), 0);
    // A reset keeps them: they count for the device's life in this process.
    assert_eq!(counters.snapshot().flush_ops, 3);
    assert_eq!(dev.counters().snapshot().flush_ops, 3);
}

#[test]
fn missing_queue_zero_refused() {
    let m = mem();
    let mut dev = Block::new(TestDisk::new(4096, false), BlockOptions::default()).unwrap();
    let int = Arc::new(CountingInterrupt::default());
    assert!(matches!(
        dev.activate(m, int, vec![]),
        Err(ActivateError::MissingQueue(0))
    ));
}

#[test]
fn raw_file_through_mmio() {
    for kind in engines() {
        raw_file_through_mmio_with(kind);
    }
}

fn raw_file_through_mmio_with(kind: EngineKind) {
    use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
    use crate::virtio::testing::{AVAIL, DESC, USED};
    use crate::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
    use crate::BusDevice;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let disk: Arc<dyn DiskBackend> = Arc::from(
        block::open(
            &path,
            block::OpenOptions {
                format: Some(Format::Raw),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let dev = Block::new(
        disk,
        BlockOptions {
            serial: "raw0".into(),
            engine: kind,
            ..Default::default()
        },
    )
    .unwrap();
    let m = mem();
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut t = MmioTransport::new(m.clone(), irq.clone(), Box::new(dev)).unwrap();
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let r = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(&mut t, 0x8), 2);
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    w(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(&mut t, 0x14, 0);
    let lo = r(&mut t, 0x10);
    w(&mut t, 0x14, 1);
    let hi = r(&mut t, 0x10);
    w(&mut t, 0x24, 0);
    w(&mut t, 0x20, lo);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, hi);
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    w(&mut t, 0x70, ok);
    assert_eq!(r(&mut t, 0x70), ok);
    w(&mut t, 0x30, 0);
    w(&mut t, 0x38, 256);
    w(&mut t, 0x80, DESC as u32);
    w(&mut t, 0x90, AVAIL as u32);
    w(&mut t, 0xa0, USED as u32);
    w(&mut t, 0x44, 1);
    let mut d = Driver::new(&m);
    w(&mut t, 0x70, ok | STATUS_DRIVER_OK);
    assert_eq!(r(&mut t, 0x70), ok | STATUS_DRIVER_OK);

    m.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
    let out = d.request(VIRTIO_BLK_T_OUT, 100, &[(DATA, 4096, R)]);
    let flush = d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    w(&mut t, QUEUE_NOTIFY_OFFSET, 0);
    d.tq.wait_used(2);
    let inp = d.request(VIRTIO_BLK_T_IN, 100, &[(DATA + 0x10000, 4096, W)]);
    let id = d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x20000, 20, W)]);
    let past = d.request(VIRTIO_BLK_T_IN, 2047, &[(DATA, 1024, W)]);
    w(&mut t, QUEUE_NOTIFY_OFFSET, 0);
    d.tq.wait_used(5);
    assert_eq!(
        [out, flush, inp, id].map(|s| d.status(s)),
        [VIRTIO_BLK_S_OK; 4],
        "{kind}"
    );
    assert_eq!(d.status(past), VIRTIO_BLK_S_IOERR);
    let mut back = [0u8; 4096];
    m.read_slice(&mut back, GuestAddress(DATA + 0x10000))
        .unwrap();
    assert!(back.iter().all(|&b| b == 0x5a), "{kind}");
    let mut serial = [0u8; 4];
    m.read_slice(&mut serial, GuestAddress(DATA + 0x20000))
        .unwrap();
    assert_eq!(&serial, b"raw0");
    assert_eq!(r(&mut t, 0x60) & 1, 1);
    // The data is in the file.
    w(&mut t, 0x70, 0);
    let file = std::fs::read(&path).unwrap();
    assert!(
        file[100 * 512..100 * 512 + 4096].iter().all(|&b| b == 0x5a),
        "{kind}"
    );
    // Snapshot of a reset device: status 0.
    assert_eq!(t.state().status, 0);
}
