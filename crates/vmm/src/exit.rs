//! Why a VM ended, and the process exit code for each reason.
//!
//! | exit code | meaning |
//! |---|---|
//! | 0 | the guest powered off (ACPI S5), the console's quit key was pressed, or the VM migrated away |
//! | N | the guest wrote N to the exit device (port 0xf4) |
//! | 1 | Vessel failed: bad configuration, unusable kernel, KVM error (one-line message) |
//! | 2 | bad command line (from the argument parser) |
//! | 3 | the guest reset the machine (ACPI reset register, i8042 reset, `reboot`) |
//! | 4 | the guest crashed: triple fault, or an exit KVM could not handle |
//! | 70 | Vessel hit an internal error (a panic, in any thread): a bug, reported on stderr |
//! | 130 | SIGINT |
//! | 143 | SIGTERM |

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reset,
    GuestExit(u8),
    /// Triple fault or an unhandled exit, with a description.
    Crash(String),
    Signal(i32),
    ConsoleQuit,
    /// A host-side failure while running (a KVM error on a vCPU).
    Error(String),
    /// The VM now runs in another process (live migration), named here.
    Migrated(String),
}

pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_RESET: i32 = 3;
pub const EXIT_CRASH: i32 = 4;
/// A panic anywhere in the process (EX_SOFTWARE of sysexits.h).
pub const EXIT_PANIC: i32 = 70;

/// Makes every panic fatal and loud: the message names the thread, and the process ends at
/// once with [`EXIT_PANIC`]. A panicking vCPU or device thread would otherwise end alone and
/// leave the VM hung; an API handler's panic would be swallowed by the server.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // A backtrace reads the binary's symbols: files no seccomp filter lets a thread open.
        let bt = match jail::seccomp::active() {
            false => std::backtrace::Backtrace::capture(),
            true => std::backtrace::Backtrace::disabled(),
        };
        let bt = match bt.status() {
            std::backtrace::BacktraceStatus::Captured => format!("\n{bt}"),
            _ => String::new(),
        };
        // One write, so lines of other threads cannot cut into it.
        let msg = format!(
            "vessel: internal error: thread '{name}' panicked{at}: {what}; the VM is stopped \
             (exit code {EXIT_PANIC}){bt}\n"
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), msg.as_bytes());
        std::process::exit(EXIT_PANIC);
    }));
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::ConsoleQuit | ExitReason::Migrated(_) => 0,
            ExitReason::GuestExit(n) => i32::from(*n),
            ExitReason::Reset => EXIT_RESET,
            ExitReason::Crash(_) => EXIT_CRASH,
            ExitReason::Signal(s) => 128 + s,
            ExitReason::Error(_) => EXIT_ERROR,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest reset the machine"),
            ExitReason::GuestExit(n) => write!(f, "guest exited with status {n}"),
            ExitReason::Crash(why) => write!(f, "guest crashed: {why}"),
            ExitReason::Signal(s) => write!(f, "stopped by signal {s}"),
            ExitReason::ConsoleQuit => write!(f, "quit from the console"),
            ExitReason::Error(e) => write!(f, "{e}"),
            ExitReason::Migrated(to) => write!(f, "the VM migrated to {to}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(ExitReason::PowerOff.code(), 0);
        assert_eq!(ExitReason::GuestExit(42).code(), 42);
        assert_eq!(ExitReason::Reset.code(), 3);
        assert_eq!(ExitReason::Crash("x".into()).code(), 4);
        assert_eq!(ExitReason::Signal(15).code(), 143);
    }
}
