//! The serial console's host side: the terminal (raw mode, Ctrl-A x to quit), a file, or a Unix
//! socket clients attach to.

use std::collections::VecDeque;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock;
use devices::legacy::SerialInput;
use nix::sys::termios::{self, OutputFlags, SetArg, Termios};

use crate::config::ConsoleConfig;
use crate::control::Control;
use crate::exit::ExitReason;

/// The escape key (Ctrl-A) and the key after it that quits.
pub const ESCAPE: u8 = 0x01;
pub const QUIT_KEY: u8 = b'x';
/// How much console output a socket console keeps for the next client.
const SOCKET_BACKLOG: usize = 64 * 1024;

/// Console errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open console file {0}: {1}")]
    File(PathBuf, #[source] std::io::Error),
    #[error("cannot listen on console socket {0}: {1}")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("console socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot start the console input thread: {0}")]
    Thread(#[source] std::io::Error),
}

enum Input {
    None,
    Stdin {
        tty: bool,
    },
    Socket(
        UnixListener,
        Arc<Mutex<Option<UnixStream>>>,
        Arc<Mutex<VecDeque<u8>>>,
    ),
}

/// An opened console: the serial port's output writer, and the input side to start once the
/// serial port exists. Restores the terminal when dropped.
pub struct Console {
    output: Option<Box<dyn Write + Send>>,
    input: Input,
    saved_termios: Option<Termios>,
}

impl Console {
    pub fn open(cfg: &ConsoleConfig) -> Result<Self, Error> {
        let mut c = Console {
            output: None,
            input: Input::None,
            saved_termios: None,
        };
        match cfg {
            ConsoleConfig::Off => c.output = Some(Box::new(std::io::sink())),
            ConsoleConfig::File(p) => {
                let f = devices::output::CappedFile::create(p)
                    .map_err(|e| Error::File(p.clone(), e))?;
                c.output = Some(Box::new(f));
            }
            ConsoleConfig::Stdio => {
                let tty = std::io::stdin().is_terminal();
                if tty {
                    c.saved_termios = set_raw_mode();
                    eprintln!("vessel: serial console on this terminal; press Ctrl-A x to quit\r");
                }
                c.output = Some(Box::new(std::io::stdout()));
                c.input = Input::Stdin { tty };
            }
            ConsoleConfig::Socket(p) => {
                let listener = listen(p)?;
                let client = Arc::new(Mutex::new(None));
                let backlog = Arc::new(Mutex::new(VecDeque::new()));
                c.output = Some(Box::new(SocketOut {
                    client: client.clone(),
                    backlog: backlog.clone(),
                }));
                c.input = Input::Socket(listener, client, backlog);
            }
        }
        Ok(c)
    }

    /// The writer the serial port sends its output to (taken once).
    pub fn take_output(&mut self) -> Box<dyn Write + Send> {
        self.output
            .take()
            .unwrap_or_else(|| Box::new(std::io::sink()))
    }

    /// Starts forwarding host input into the serial port.
    pub fn start_input(&mut self, serial: SerialInput, control: Arc<Control>) -> Result<(), Error> {
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            jail::seccomp::spawn(jail::seccomp::ThreadClass::Console, name.into(), f)
                .map(|_| ())
                .map_err(Error::Thread)
        };
        match std::mem::replace(&mut self.input, Input::None) {
            Input::None => Ok(()),
            Input::Stdin { tty } => spawn(
                "console-in",
                Box::new(move || stdin_loop(serial, control, tty)),
            ),
            Input::Socket(listener, client, backlog) => spawn(
                "console-accept",
                Box::new(move || accept_loop(listener, client, backlog, serial)),
            ),
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(t) = self.saved_termios.take() {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &t);
        }
    }
}

/// Raw input (no echo, no line editing, no signals from keys) with output processing kept, so
/// a guest's bare "\n" still starts a new line. Returns the settings to restore.
fn set_raw_mode() -> Option<Termios> {
    let stdin = std::io::stdin();
    let saved = termios::tcgetattr(&stdin).ok()?;
    let mut raw = saved.clone();
    termios::cfmakeraw(&mut raw);
    raw.output_flags |= OutputFlags::OPOST | OutputFlags::ONLCR;
    termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
    Some(saved)
}

/// Pushes all of `bytes` into the serial FIFO, waiting while the guest drains it.
fn push_all(serial: &SerialInput, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = serial.push(bytes);
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Separates the escape sequence from what goes to the guest. Returns true on quit.
#[derive(Default)]
struct EscapeFilter {
    pending_escape: bool,
}

impl EscapeFilter {
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.pending_escape {
                self.pending_escape = false;
                match b {
                    QUIT_KEY => return true,
                    // Ctrl-A Ctrl-A sends one Ctrl-A.
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending_escape = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

fn stdin_loop(serial: SerialInput, control: Arc<Control>, tty: bool) {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 256];
    let mut esc = EscapeFilter::default();
    let mut out = Vec::with_capacity(256);
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        out.clear();
        if tty {
            if esc.filter(&buf[..n], &mut out) {
                control.request_exit(ExitReason::ConsoleQuit);
                return;
            }
        } else {
            out.extend_from_slice(&buf[..n]);
        }
        push_all(&serial, &out);
    }
}

fn listen(p: &Path) -> Result<UnixListener, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(p) {
        if !meta.file_type().is_socket() {
            return Err(Error::NotASocket(p.to_path_buf()));
        }
        // A stale socket from an earlier run.
        let _ = std::fs::remove_file(p);
    }
    UnixListener::bind(p).map_err(|e| Error::Socket(p.to_path_buf(), e))
}

struct SocketOut {
    client: Arc<Mutex<Option<UnixStream>>>,
    backlog: Arc<Mutex<VecDeque<u8>>>,
}

impl Write for SocketOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut backlog = lock(&self.backlog);
        backlog.extend(buf);
        let excess = backlog.len().saturating_sub(SOCKET_BACKLOG);
        backlog.drain(..excess);
        drop(backlog);
        let mut client = lock(&self.client);
        if let Some(c) = client.as_ref() {
            if devices::output::send_without_waiting(c, buf).is_err() {
                *client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn accept_loop(
    listener: UnixListener,
    client: Arc<Mutex<Option<UnixStream>>>,
    backlog: Arc<Mutex<VecDeque<u8>>>,
    serial: SerialInput,
) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        {
            // Replay recent output, then make this the client (replacing an older one).
            let b = lock(&backlog);
            let (a, c) = b.as_slices();
            if stream
                .write_all(a)
                .and_then(|_| stream.write_all(c))
                .is_err()
            {
                continue;
            }
            *lock(&client) = Some(stream);
        }
        let serial = serial.clone();
        let _ = jail::seccomp::spawn(
            jail::seccomp::ThreadClass::Console,
            "console-sock".into(),
            move || {
                let mut reader = reader;
                let mut buf = [0u8; 256];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    push_all(&serial, &buf[..n]);
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!f.filter(b"ab\x01\x01c\x01", &mut out));
        assert_eq!(out, b"ab\x01c");
        out.clear();
        assert!(!f.filter(b"z", &mut out));
        assert_eq!(out, b"\x01z");
        out.clear();
        assert!(f.filter(b"q\x01x", &mut out));
        assert_eq!(out, b"q");
    }

    #[test]
    fn socket_console_rejects_regular_files() {
        let p = std::env::temp_dir().join(format!("vessel-console-{}", std::process::id()));
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(
            Console::open(&ConsoleConfig::Socket(p.clone())),
            Err(Error::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"data", "no data lost");
        std::fs::remove_file(p).unwrap();
    }
}
