//! `vessel vm console`: this terminal on a VM's serial console socket (which replays its
//! scrollback to a new client). Ctrl-] detaches; the VM runs on.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::cli::CliError;

/// The byte that detaches (Ctrl-], as telnet and virsh console).
const ESCAPE: u8 = 0x1d;

/// The terminal's settings, put back when dropped.
struct Raw {
    saved: Option<rustix::termios::Termios>,
}

impl Raw {
    fn enter() -> Raw {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return Raw { saved: None }; // not a terminal: copy as is
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        Raw { saved: Some(saved) }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(s) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                s,
            );
        }
    }
}

/// Copies between this terminal and the console socket until Ctrl-], the end of input, or
/// the VM's end.
pub fn attach(name: &str, socket: &Path) -> Result<i32, CliError> {
    let sock = UnixStream::connect(socket).map_err(|source| CliError::Io {
        what: format!("{name}'s console ({}): is it running?", socket.display()),
        source,
    })?;
    eprintln!("Connected to {name}'s console; Ctrl-] detaches.\r");
    let raw = Raw::enter();
    let mut from_vm = sock.try_clone().map_err(|source| CliError::Io {
        what: "console".into(),
        source,
    })?;
    let output = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        // The VM's end (or the console's): leave as if detached.
        drop(raw);
        eprintln!("\r\nThe console closed (the VM ended).\r");
        std::process::exit(0);
    });
    let mut to_vm = sock;
    let mut buf = [0u8; 1024];
    let mut stdin = std::io::stdin();
    loop {
        let n = match stdin.read(&mut buf) {
            // The end of input (a pipe, /dev/null): nothing more to send, but the console
            // goes on showing until the VM ends or this is interrupted.
            Ok(0) => {
                let _ = to_vm.shutdown(std::net::Shutdown::Write);
                let _ = output.join();
                return Ok(0);
            }
            Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let (send, detach) = match chunk.iter().position(|&b| b == ESCAPE) {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if to_vm.write_all(send).is_err() || detach {
            break;
        }
    }
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    eprintln!("\r\nDetached from {name}'s console.\r");
    Ok(0)
}
