//! seccomp-bpf filters per thread class, built with rust-vmm's `seccompiler`.
//!
//! [`init`] picks the mode for the process (`on`: a call outside the thread's list is
//! trapped, reported with the thread and the call, and ends the process with
//! [`EXIT_SECCOMP`]; `log`: the kernel logs it and lets it through; `off`). From then on every
//! thread starts through [`spawn`], which has a spawner thread create it: a filter is
//! inherited by the threads its thread creates, so a device worker started from a vCPU
//! thread would otherwise carry the vCPU's filter on top of its own. The spawner's filter
//! allows what any class may do, so each thread ends up with exactly its own class's list.
//! The main thread calls [`enter`] itself once the VM is built.

mod filters;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The exit code of a process that made a forbidden system call (mode `on`).
pub const EXIT_SECCOMP: i32 = 71;

/// Errors setting filters up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp filter for {class:?} threads: {reason}")]
    Build { class: ThreadClass, reason: String },
    #[error("cannot install the seccomp filter of a {class:?} thread: {reason}")]
    Apply { class: ThreadClass, reason: String },
    #[error("cannot install the SIGSYS handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot start the thread spawner: {0}")]
    Spawner(std::io::Error),
    #[error("invalid --seccomp '{0}': expected on, log or off")]
    Mode(String),
}

/// What a filter does with a call outside its thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Trap it: the process reports the thread and the call, and ends.
    On,
    /// Let it through; the kernel logs it (the audit log, `dmesg`).
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode, Error> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(Error::Mode(s.to_string())),
        }
    }
}

/// The kinds of threads of a VMM process, each with its own list of system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadClass {
    /// Runs one vCPU (KVM_RUN) and the port and MMIO handlers it exits to.
    Vcpu,
    /// A virtio device's worker (its queues, its backend).
    Device,
    /// A disk's I/O thread pool.
    BlockIo,
    /// Console input and socket consoles.
    Console,
    /// The control API's server and its blocking pool (snapshots, pause, info).
    Api,
    /// A live migration's sending or post-copy thread.
    Migration,
    /// The userfaultfd pager.
    Pager,
    /// The main thread, once the VM is built: waits for its end, restarts it, tears it down.
    Main,
    /// Creates every other thread.
    Spawner,
}

impl ThreadClass {
    pub const ALL: [ThreadClass; 9] = [
        ThreadClass::Vcpu,
        ThreadClass::Device,
        ThreadClass::BlockIo,
        ThreadClass::Console,
        ThreadClass::Api,
        ThreadClass::Migration,
        ThreadClass::Pager,
        ThreadClass::Main,
        ThreadClass::Spawner,
    ];

    /// The name the `VESSEL_TEST_SECCOMP` hook takes.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::Device => "device",
            ThreadClass::BlockIo => "block-io",
            ThreadClass::Console => "console",
            ThreadClass::Api => "api",
            ThreadClass::Migration => "migration",
            ThreadClass::Pager => "pager",
            ThreadClass::Main => "main",
            ThreadClass::Spawner => "spawner",
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The process's mode (set once by [`init`]; off until then).
static MODE: OnceLock<Mode> = OnceLock::new();
/// The spawner's queue, when filters are on.
static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
/// Each class's compiled filter.
static PROGRAMS: OnceLock<BTreeMap<ThreadClass, BpfProgram>> = OnceLock::new();

thread_local! {
    /// This thread's class, for the report of a forbidden call.
    static CLASS: Cell<Option<ThreadClass>> = const { Cell::new(None) };
}

/// The process's mode.
pub fn mode() -> Mode {
    MODE.get().copied().unwrap_or(Mode::Off)
}

/// Whether this process runs its threads under filters.
pub fn active() -> bool {
    mode() != Mode::Off
}

/// Sets the process's mode, compiles the filters and starts the spawner (under its own
/// filter). Call once, before any other thread starts.
pub fn init(mode: Mode) -> Result<(), Error> {
    if MODE.set(mode).is_err() || mode == Mode::Off {
        return Ok(());
    }
    let action = match mode {
        Mode::On => SeccompAction::Trap,
        _ => SeccompAction::Log,
    };
    let mut programs = BTreeMap::new();
    for class in ThreadClass::ALL {
        programs.insert(class, compile(class, action.clone())?);
    }
    let _ = PROGRAMS.set(programs);
    install_sigsys_handler()?;
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("vessel-spawner".into())
        .spawn(move || {
            if let Err(e) = enter(ThreadClass::Spawner) {
                // No thread can start filtered: say so on every spawn.
                eprintln!("vessel: error: {e}");
                return;
            }
            for job in rx {
                job();
            }
        })
        .map_err(Error::Spawner)?;
    let _ = SPAWNER.set(Mutex::new(tx));
    Ok(())
}

fn compile(class: ThreadClass, mismatch: SeccompAction) -> Result<BpfProgram, Error> {
    let rules = filters::groups(class)
        .iter()
        .flat_map(|g| g.iter())
        .map(|(nr, _)| (*nr, Vec::new()))
        .collect();
    let build = |reason: String| Error::Build { class, reason };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// Puts the calling thread under `class`'s filter (nothing when filters are off).
pub fn enter(class: ThreadClass) -> Result<(), Error> {
    CLASS.with(|c| c.set(Some(class)));
    let Some(program) = PROGRAMS.get().and_then(|p| p.get(&class)) else {
        return Ok(());
    };
    seccompiler::apply_filter(program).map_err(|e| Error::Apply {
        class,
        reason: e.to_string(),
    })?;
    test_hook(class);
    Ok(())
}

/// A fault-injection point for tests: with `VESSEL_TEST_SECCOMP=<class name>` a thread of
/// that class makes a call no filter allows, right after its filter is in place.
fn test_hook(class: ThreadClass) {
    if std::env::var("VESSEL_TEST_SECCOMP").is_ok_and(|c| c == class.name()) {
        // SAFETY: personality(0xffffffff) only reads the process's execution domain.
        unsafe { libc::syscall(filters::FORBIDDEN_PROBE.0, 0xffff_ffffu64) };
    }
}

/// Starts a thread named `name` of `class`: created by the spawner when filters are on, so
/// that it carries its own class's filter only.
pub fn spawn<F, T>(class: ThreadClass, name: String, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = std::thread::Builder::new().name(name);
    let run = move || {
        if let Err(e) = enter(class) {
            // A thread that cannot be confined must not run unconfined.
            eprintln!("vessel: error: {e}");
            std::process::exit(EXIT_SECCOMP);
        }
        f()
    };
    let Some(spawner) = SPAWNER.get() else {
        return builder.spawn(run);
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(run));
    });
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| std::io::Error::other("the thread spawner has stopped"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the thread spawner has stopped"))?
}

/// Reports a trapped call and ends the process. Only async-signal-safe work: formatting into
/// a stack buffer, one `write`, `_exit`.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The trapped call's number: `si_syscall` of the kernel's `_sigsys` member, 24 bytes into
    // x86-64's siginfo (after signo, errno, code and the call address).
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler; a SIGSYS from
    // seccomp fills `_sigsys`.
    let nr = unsafe {
        (info as *const u8)
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let mut buf = [0u8; 256];
    let mut w = Cursor {
        buf: &mut buf,
        at: 0,
    };
    w.put("vessel: seccomp: a ");
    w.put(
        CLASS
            .with(|c| c.get())
            .map_or("unconfined", ThreadClass::name),
    );
    w.put(" thread made a forbidden system call: ");
    match filters::name(i64::from(nr)) {
        Some(n) => w.put(n),
        None => {
            w.put("number ");
            w.num(nr as u64);
        }
    }
    w.put("; the VM is stopped\n");
    let len = w.at;
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// A fixed buffer to format into without allocating.
struct Cursor<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Cursor<'_> {
    fn put(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.at);
        self.buf[self.at..self.at + n].copy_from_slice(&b[..n]);
        self.at += n;
    }
    fn num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.bytes(&digits[i..]);
    }
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is valid; the handler only does async-signal-safe work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(Error::Signal(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_compiles_and_modes_parse() {
        for class in ThreadClass::ALL {
            compile(class, SeccompAction::Trap).unwrap();
        }
        assert_eq!("on".parse::<Mode>().unwrap(), Mode::On);
        assert_eq!("log".parse::<Mode>().unwrap(), Mode::Log);
        assert!("maybe".parse::<Mode>().is_err());
    }

    #[test]
    fn the_report_formats_numbers() {
        let mut buf = [0u8; 32];
        let mut c = Cursor {
            buf: &mut buf,
            at: 0,
        };
        c.put("nr ");
        c.num(4096);
        c.num(0);
        let n = c.at;
        assert_eq!(&buf[..n], b"nr 40960");
        // Cut at the end of the buffer, never past it.
        let mut small = [0u8; 4];
        let mut c = Cursor {
            buf: &mut small,
            at: 0,
        };
        c.put("overflowing");
        assert_eq!(&small, b"over");
    }
}
