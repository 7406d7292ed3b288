//! Command-line options: space separated `key=value` words; unknown words
//! are ignored, a known option with a bad value is an error.

/// What to do once every CPU has reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `action=exit:N` (default `exit:0`): exit device with status N.
    Exit(u8),
    /// `action=poweroff`: ACPI S5.
    Poweroff,
    /// `action=reboot`: i8042 reset (0xfe to port 0x64).
    Reboot,
    /// `action=triplefault`: zero-limit IDT, then fault, in ring 0.
    TripleFault,
    /// `action=hold`: spin in ring 3 forever.
    Hold,
    /// `action=fault`: execute `ud2` in ring 3, to exercise the exception
    /// path (prints `FAIL: exception 6 ...`, exit status 2).
    Fault,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub action: Action,
    /// `work=N`: workload size multiplier (default 1).
    pub work: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            action: Action::Exit(0),
            work: 1,
        }
    }
}

/// Largest accepted `work=N`.
const MAX_WORK: u64 = 4096;

impl Options {
    /// Parse the command line; on a bad value, returns the offending word.
    pub fn parse(cmdline: &[u8]) -> Result<Options, &[u8]> {
        let mut opts = Options::default();
        for word in cmdline.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
            if let Some(value) = word.strip_prefix(b"action=") {
                opts.action = parse_action(value).ok_or(word)?;
            } else if let Some(value) = word.strip_prefix(b"work=") {
                opts.work = parse_number(value)
                    .filter(|&n| (1..=MAX_WORK).contains(&n))
                    .ok_or(word)?;
            }
        }
        Ok(opts)
    }
}

fn parse_action(value: &[u8]) -> Option<Action> {
    Some(match value {
        b"poweroff" => Action::Poweroff,
        b"reboot" => Action::Reboot,
        b"triplefault" => Action::TripleFault,
        b"hold" => Action::Hold,
        b"fault" => Action::Fault,
        b"exit" => Action::Exit(0),
        _ => {
            let status = parse_number(value.strip_prefix(b"exit:")?)?;
            Action::Exit(u8::try_from(status).ok()?)
        }
    })
}

/// A decimal or `0x` hexadecimal number.
fn parse_number(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in digits {
        let d = (b as char).to_digit(radix)?;
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(n)
}
