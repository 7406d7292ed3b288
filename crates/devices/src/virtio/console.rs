//! virtio-console (virtio 1.2 §5.3): one port, no MULTIPORT. Queue 0 (receiveq) carries host
//! input to the guest, queue 1 (transmitq) the guest's output to the host. `EMERG_WRITE` is
//! offered: a byte written to `emerg_wr` in the config space goes straight to the output.
//!
//! The host side is a [`ConsoleBackend`]: an output writer and, optionally, an input
//! ([`ConsoleInput`], a bounded buffer that wakes the worker) fed by a thread reading stdin or a
//! Unix socket's client, the same backends as the serial console's.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guestmem::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{
    pop_head, process_queue, process_queue_until, walk_chain, Chain, ChainHandler, Cursor,
    QueueError,
};
use super::worker::{
    pause_thread, resume_thread, DeviceThread, StopSignal, WorkerError, WorkerLoop,
};
use super::{
    feature, read_config_bytes, ActivateError, ActiveQueue, DeviceSpecificState, VirtioDevice,
    VirtioInterrupt, VirtioInterruptType, VIRTIO_F_VERSION_1,
};
use crate::bus::lock;

/// The virtio device type.
pub const TYPE_CONSOLE: u32 = 3;
/// Emergency write feature.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Host input buffered for the guest at most; more waits in the feeding thread.
pub const INPUT_BUFFER: usize = 64 << 10;
/// Most output bytes taken from one transmit chain.
pub const MAX_TX_CHAIN: u64 = 1 << 20;

const FEATURES: u64 = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_CONSOLE_F_EMERG_WRITE);
const CONFIG_LEN: usize = 12;
const EMERG_WR_OFFSET: u64 = 8;
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_INPUT: u64 = 2;
const TOKEN_EXIT: u64 = 3;

/// Errors of the console device and its backends.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open console file {0}: {1}")]
    File(PathBuf, #[source] io::Error),
    #[error("cannot listen on console socket {0}: {1}")]
    Socket(PathBuf, #[source] io::Error),
    #[error("console socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("console: {0}")]
    Io(#[source] io::Error),
}

/// The device's state for snapshots (the host side is reopened, not saved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Host input not yet delivered.
    pub pending_input: Vec<u8>,
}

/// Host input waiting for the guest. Cloning shares it.
#[derive(Clone)]
pub struct ConsoleInput {
    buf: Arc<Mutex<VecDeque<u8>>>,
    wake: Arc<EventFd>,
}

impl ConsoleInput {
    pub fn new() -> Result<ConsoleInput, ConsoleError> {
        Ok(ConsoleInput {
            buf: Arc::new(Mutex::new(VecDeque::new())),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ConsoleError::Io)?),
        })
    }

    /// Queue what fits of `bytes` (up to [`INPUT_BUFFER`] pending); returns how many.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut b = lock(&self.buf);
        let n = bytes.len().min(INPUT_BUFFER.saturating_sub(b.len()));
        b.extend(&bytes[..n]);
        drop(b);
        if n > 0 {
            let _ = self.wake.write(1);
        }
        n
    }

    /// Queue all of `bytes`, waiting while the guest is behind.
    pub fn push_all(&self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.push(bytes);
            bytes = &bytes[n..];
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn pending(&self) -> bool {
        !lock(&self.buf).is_empty()
    }
}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;

/// Where the console's output goes and its input comes from.
pub struct ConsoleBackend {
    output: Output,
    input: Option<ConsoleInput>,
}

impl ConsoleBackend {
    /// A backend on any writer, with an optional input.
    pub fn new(output: Box<dyn Write + Send>, input: Option<ConsoleInput>) -> ConsoleBackend {
        ConsoleBackend {
            output: Arc::new(Mutex::new(output)),
            input,
        }
    }

    /// Output discarded, no input.
    pub fn off() -> ConsoleBackend {
        Self::new(Box::new(io::sink()), None)
    }

    /// Output written to a new file, no input.
    pub fn file(path: &Path) -> Result<ConsoleBackend, ConsoleError> {
        let f = crate::output::CappedFile::create(path)
            .map_err(|e| ConsoleError::File(path.to_path_buf(), e))?;
        Ok(Self::new(Box::new(f), None))
    }

    /// Output to stdout, input from stdin (read by a thread that lives as long as stdin).
    pub fn stdio() -> Result<ConsoleBackend, ConsoleError> {
        let input = ConsoleInput::new()?;
        let feed = input.clone();
        jail::seccomp::spawn(CONSOLE, "vconsole-in".into(), move || {
            copy_into(io::stdin(), &feed)
        })
        .map_err(ConsoleError::Io)?;
        Ok(Self::new(Box::new(io::stdout()), Some(input)))
    }

    /// A Unix socket Vessel listens on: one client at a time (a new one replaces the old)
    /// reads the output and types the input. Output without a client is dropped.
    pub fn socket(path: &Path) -> Result<ConsoleBackend, ConsoleError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ConsoleError::NotASocket(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|e| ConsoleError::Socket(path.to_path_buf(), e))?;
        let input = ConsoleInput::new()?;
        let client: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let (feed, current) = (input.clone(), client.clone());
        jail::seccomp::spawn(CONSOLE, "vconsole-accept".into(), move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                *lock(&current) = Some(stream);
                let feed = feed.clone();
                let _ = jail::seccomp::spawn(CONSOLE, "vconsole-sock".into(), move || {
                    copy_into(reader, &feed)
                });
            }
        })
        .map_err(ConsoleError::Io)?;
        Ok(Self::new(Box::new(SocketOut(client)), Some(input)))
    }
}

const CONSOLE: jail::seccomp::ThreadClass = jail::seccomp::ThreadClass::Console;

fn copy_into(mut from: impl Read, to: &ConsoleInput) {
    let mut buf = [0u8; 256];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => to.push_all(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

struct SocketOut(Arc<Mutex<Option<UnixStream>>>);

impl Write for SocketOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut client = lock(&self.0);
        if let Some(c) = client.as_ref() {
            if crate::output::send_without_waiting(c, buf).is_err() {
                *client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The console device.
pub struct Console {
    acked: u64,
    output: Output,
    input: ConsoleInput,
    worker: Option<Worker>,
}

impl Console {
    pub fn new(backend: ConsoleBackend) -> Result<Console, ConsoleError> {
        let input = match backend.input {
            Some(i) => i,
            None => ConsoleInput::new()?,
        };
        Ok(Console {
            acked: 0,
            output: backend.output,
            input,
            worker: None,
        })
    }

    /// The device's state for snapshots.
    pub fn console_state(&self) -> ConsoleState {
        ConsoleState {
            pending_input: lock(&self.input.buf).iter().copied().collect(),
        }
    }

    /// Restore into an inactive device: the saved input goes before anything typed since.
    fn restore_console_state(&mut self, s: &ConsoleState) {
        let mut b = lock(&self.input.buf);
        let typed: Vec<u8> = b.drain(..).collect();
        b.extend(&s.pending_input);
        b.extend(typed);
        let excess = b.len().saturating_sub(INPUT_BUFFER);
        b.drain(..excess);
        drop(b);
        let _ = self.input.wake.write(1);
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & FEATURES;
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (0: unknown), max_nr_ports 1, emerg_wr (reads as 0).
        let mut c = [0u8; CONFIG_LEN];
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr: the low byte of a write at its start is one output character.
        if offset == EMERG_WR_OFFSET {
            if let Some(&b) = data.first() {
                let mut out = lock(&self.output);
                let _ = out.write_all(&[b]);
                let _ = out.flush();
            }
        }
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let mut slots: [Option<ActiveQueue>; 2] = [None, None];
        for q in queues {
            if let Some(s) = slots.get_mut(usize::from(q.index)) {
                *s = Some(q);
            }
        }
        let [Some(rx), Some(tx)] = slots else {
            let missing = slots.iter().position(|s| s.is_none()).unwrap_or(0);
            return Err(ActivateError::MissingQueue(missing as u16));
        };
        let w = Worker::spawn(
            [rx, tx],
            mem,
            interrupt,
            self.output.clone(),
            self.input.clone(),
        )
        .map_err(|e| ActivateError::Worker(e.into()))?;
        self.worker = Some(w);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.acked = 0;
    }

    fn queue_states(&self) -> Vec<(u16, QueueState)> {
        self.worker
            .as_ref()
            .map_or_else(Vec::new, |w| super::numbered_queue_states(&w.queues))
    }

    fn pause(&mut self) {
        // Host input keeps arriving in the input buffer (bounded) meanwhile.
        pause_thread(self.worker.as_mut().map(|w| &mut w.thread));
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_thread(self.worker.as_mut().map(|w| &mut w.thread))
    }

    fn device_state(&self) -> DeviceSpecificState {
        DeviceSpecificState::Console(self.console_state())
    }

    fn restore_device_state(&mut self, state: &DeviceSpecificState) -> Result<(), ActivateError> {
        match state {
            DeviceSpecificState::Console(c) => {
                self.restore_console_state(c);
                Ok(())
            }
            other => Err(ActivateError::StateMismatch(format!(
                "console state expected, {other:?} saved"
            ))),
        }
    }
}

/// Transmit chains: their readable bytes go to the output.
struct TxHandler {
    output: Output,
    buf: Vec<u8>,
}

impl ChainHandler for TxHandler {
    fn handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> u32 {
        if let Err(e) = chain.validate(mem, usize::from(QUEUE_SIZE)) {
            tracing::debug!("virtio-console: bad transmit chain: {e}");
            return 0;
        }
        let mut r = Cursor::new(chain.readable(), MAX_TX_CHAIN);
        self.buf.resize(r.remaining() as usize, 0);
        if r.read(mem, &mut self.buf).is_ok() {
            let mut out = lock(&self.output);
            let _ = out.write_all(&self.buf);
            let _ = out.flush();
        }
        0
    }
}

/// Fill receive chains from the pending input; returns whether the driver must be interrupted.
fn serve_rx(
    q: &mut Queue,
    mem: &GuestMem,
    chain: &mut Chain,
    input: &ConsoleInput,
    stop: &AtomicBool,
) -> Result<bool, QueueError> {
    let mut used = false;
    for _ in 0..q.size() {
        if !input.pending() || stop.load(Ordering::Acquire) {
            break;
        }
        let Some(head) = pop_head(q, mem)? else {
            break;
        };
        walk_chain(q, mem, head, chain);
        let mut len = 0;
        if chain.validate(mem, usize::from(QUEUE_SIZE)).is_ok() {
            let mut w = Cursor::new(chain.writable(), u64::MAX);
            let mut b = lock(&input.buf);
            let n = (w.remaining() as usize).min(b.len());
            let bytes: Vec<u8> = b.iter().take(n).copied().collect();
            if w.write(mem, &bytes).is_ok() {
                b.drain(..n);
                len = n as u32;
            }
        }
        q.add_used(mem, head, len)
            .map_err(|e| QueueError::Ring(e.to_string()))?;
        used = true;
    }
    Ok(used && q.needs_notification(mem).unwrap_or(true))
}

/// One pass over the transmit queue (into `output`) and one over the receive queue (from
/// `input`), as the worker makes them, without the worker thread: the fuzz target's way in.
/// Returns whether the driver would be interrupted.
#[doc(hidden)]
pub fn serve_once(
    txq: &mut Queue,
    rxq: &mut Queue,
    mem: &GuestMem,
    output: Box<dyn Write + Send>,
    input: &ConsoleInput,
) -> Result<bool, QueueError> {
    let mut chain = Chain::default();
    let mut handler = TxHandler {
        output: Arc::new(Mutex::new(output)),
        buf: Vec::new(),
    };
    let tx = process_queue(txq, mem, &mut chain, &mut handler)?;
    let rx = serve_rx(rxq, mem, &mut chain, input, &AtomicBool::new(false))?;
    Ok(tx.notify || rx)
}

struct Worker {
    queues: Vec<Arc<Mutex<Queue>>>,
    thread: DeviceThread<ConsoleLoop>,
}

/// What the worker thread owns.
struct ConsoleLoop {
    rxq: Arc<Mutex<Queue>>,
    txq: Arc<Mutex<Queue>>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    epoll: Epoll,
    stop: StopSignal,
    mem: GuestMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    input: ConsoleInput,
    handler: TxHandler,
    chain: Chain,
    broken: bool,
}

impl Worker {
    fn spawn(
        queues: [ActiveQueue; 2],
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        output: Output,
        input: ConsoleInput,
    ) -> Result<Worker, WorkerError> {
        let [rx, tx] = queues;
        let rxq = Arc::new(Mutex::new(rx.queue));
        let txq = Arc::new(Mutex::new(tx.queue));
        let shared = vec![rxq.clone(), txq.clone()];
        let thread = DeviceThread::spawn("virtio-console".into(), move |stop| {
            let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
            for (fd, token) in [
                (rx.notifier.as_raw_fd(), TOKEN_RX),
                (tx.notifier.as_raw_fd(), TOKEN_TX),
                (input.wake.as_raw_fd(), TOKEN_INPUT),
                (stop.raw_fd(), TOKEN_EXIT),
            ] {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(WorkerError::Epoll)?;
            }
            Ok(ConsoleLoop {
                rxq,
                txq,
                rx_kick: rx.notifier,
                tx_kick: tx.notifier,
                epoll,
                stop,
                mem,
                interrupt,
                input,
                handler: TxHandler {
                    output,
                    buf: Vec::new(),
                },
                chain: Chain::default(),
                broken: false,
            })
        })?;
        Ok(Worker {
            queues: shared,
            thread,
        })
    }
}

impl WorkerLoop for ConsoleLoop {
    fn run(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        // Serve what is there already (after an activation, a restore or a pause).
        let mut tx_again = true;
        loop {
            if !self.broken {
                let mut r = Ok(None);
                if tx_again {
                    tx_again = false;
                    r = process_queue_until(
                        &mut lock(&self.txq),
                        &self.mem,
                        &mut self.chain,
                        &mut self.handler,
                        self.stop.flag(),
                    )
                    .map(|p| {
                        tx_again = p.pending;
                        p.notify.then_some(1u16)
                    });
                }
                let r = r.and_then(|t| {
                    if let Some(q) = t {
                        let _ = self.interrupt.trigger(VirtioInterruptType::Queue(q));
                    }
                    serve_rx(
                        &mut lock(&self.rxq),
                        &self.mem,
                        &mut self.chain,
                        &self.input,
                        self.stop.flag(),
                    )
                });
                match r {
                    Ok(true) => {
                        let _ = self.interrupt.trigger(VirtioInterruptType::Queue(0));
                    }
                    Ok(false) => {}
                    Err(e) => {
                        crate::warn_limited!("virtio-console: {e}; device needs a reset");
                        self.broken = true;
                        self.interrupt.set_needs_reset();
                    }
                }
            }
            let timeout = if tx_again { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-console: epoll: {e}; worker stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => return,
                    TOKEN_RX => {
                        let _ = self.rx_kick.read();
                    }
                    TOKEN_TX => {
                        let _ = self.tx_kick.read();
                        tx_again = true;
                    }
                    _ => {
                        let _ = self.input.wake.read();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, R, W};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn wait_for(f: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(5), "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn activate<'a>(
        m: &'a GuestMem,
        dev: &mut Console,
    ) -> (
        TestQueue<'a>,
        TestQueue<'a>,
        Vec<EventFd>,
        Arc<CountingInterrupt>,
    ) {
        let rx = TestQueue::new_at(m, 16, 0);
        let tx = TestQueue::new_at(m, 16, 0x10000);
        let mut kicks = Vec::new();
        let mut queues = Vec::new();
        for (i, q) in [rx.queue(), tx.queue()].into_iter().enumerate() {
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(e.try_clone().unwrap());
            queues.push(ActiveQueue {
                index: i as u16,
                queue: q,
                notifier: e,
            });
        }
        let int = Arc::new(CountingInterrupt::default());
        dev.ack_features(FEATURES);
        dev.activate(m.clone(), int.clone(), queues).unwrap();
        (rx, tx, kicks, int)
    }

    #[test]
    fn output_input_and_emergency_writes() {
        let m = mem();
        let out = Capture::default();
        let input = ConsoleInput::new().unwrap();
        let mut dev = Console::new(ConsoleBackend::new(
            Box::new(out.clone()),
            Some(input.clone()),
        ))
        .unwrap();
        let mut c = [0u8; 12];
        dev.read_config(0, &mut c);
        assert_eq!(&c[4..8], &1u32.to_le_bytes());
        let (mut rx, mut tx, kicks, int) = activate(&m, &mut dev);
        m.write_slice(b"hello ", GuestAddress(0x100000)).unwrap();
        m.write_slice(b"world", GuestAddress(0x101000)).unwrap();
        tx.add_chain(&[(0x100000, 6, R), (0x101000, 5, R)]);
        tx.add_chain(&[(0xffff_0000_0000, 6, R)]);
        tx.add_chain(&[(0x100000, 6, R), (0x102000, 8, W), (0x101000, 5, R)]);
        kicks[1].write(1).unwrap();
        tx.wait_used(3);
        assert_eq!(&*lock(&out.0), b"hello world");
        dev.write_config(EMERG_WR_OFFSET, &[b'!', 0, 0, 0]);
        dev.write_config(0, b"x");
        assert_eq!(&*lock(&out.0), b"hello world!");

        assert_eq!(input.push(b"abc"), 3);
        rx.add_chain(&[(0x200000, 2, W)]);
        kicks[0].write(1).unwrap();
        rx.wait_used(1);
        rx.add_chain(&[(0x200100, 1, R)]); // nothing writable: used empty
        rx.add_chain(&[(0x201000, 64, W)]);
        kicks[0].write(1).unwrap();
        rx.wait_used(3);
        assert_eq!(rx.used(0).1, 2);
        assert_eq!(rx.used(1).1, 0);
        assert_eq!(rx.used(2).1, 1);
        let mut b = [0u8; 2];
        m.read_slice(&mut b, GuestAddress(0x200000)).unwrap();
        assert_eq!(&b, b"ab");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x201000)).unwrap(), b'c');
        assert!(!*int.needs_reset.lock().unwrap());
        // Input while the guest has no buffers waits, bounded.
        assert_eq!(input.push(&vec![1u8; INPUT_BUFFER + 10]), INPUT_BUFFER);
        let st = dev.console_state();
        assert_eq!(st.pending_input.len(), INPUT_BUFFER);
        dev.reset();
        assert!(dev.queue_states().is_empty());
    }

    #[test]
    fn socket_backend_carries_both_ways() {
        let m = mem();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let mut dev = Console::new(ConsoleBackend::socket(&path).unwrap()).unwrap();
        let (mut rx, mut tx, kicks, _int) = activate(&m, &mut dev);
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"typed").unwrap();
        rx.add_chain(&[(0x200000, 64, W)]);
        kicks[0].write(1).unwrap();
        let mut got = Vec::new();
        wait_for(|| rx.used_idx() > 0);
        let n = rx.used(0).1 as usize;
        got.resize(n, 0);
        m.read_slice(&mut got, GuestAddress(0x200000)).unwrap();
        assert!(b"typed".starts_with(&got) && n > 0, "{got:?}");
        // The client is registered once its input arrived: output reaches it.
        m.write_slice(b"shown", GuestAddress(0x100000)).unwrap();
        tx.add_chain(&[(0x100000, 5, R)]);
        kicks[1].write(1).unwrap();
        tx.wait_used(1);
        let mut b = [0u8; 5];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"shown");
        // A regular file at the path is refused and kept.
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            ConsoleBackend::socket(&f),
            Err(ConsoleError::NotASocket(_))
        ));
    }

    #[test]
    fn state_round_trips_and_missing_queues_fail() {
        let mut dev = Console::new(ConsoleBackend::off()).unwrap();
        dev.ack_features(FEATURES);
        dev.input.push(b"zz");
        let st = dev.console_state();
        let json = serde_json::to_string(&st).unwrap();
        let back: ConsoleState = serde_json::from_str(&json).unwrap();
        let mut other = Console::new(ConsoleBackend::off()).unwrap();
        other.restore_console_state(&back);
        assert_eq!(other.console_state(), st);
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        let r = dev.activate(
            m.clone(),
            Arc::new(CountingInterrupt::default()),
            vec![ActiveQueue {
                index: 0,
                queue: tq.queue(),
                notifier: e,
            }],
        );
        assert!(matches!(r, Err(ActivateError::MissingQueue(1))));
    }
}
