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
    /// `action=idle`: park every CPU in ring 0 (`cli; hlt`): the VM runs on using no host
    /// CPU, until it is stopped from outside.
    Idle,
    /// `action=fault`: execute `ud2` in ring 3, to exercise the exception
    /// path (prints `FAIL: exception 6 ...`, exit status 2).
    Fault,
    /// `action=soak`: every CPU runs the self-checking soak workload forever
    /// (see `soak.rs`).
    Soak,
}

/// Which virtio tests run (`virtio=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioSel {
    /// No `virtio=` option: test every supported device found, silently
    /// do nothing if there is none.
    Default,
    /// `virtio=all`: like the default, but print `virtio: none found`.
    All,
    /// `virtio=off` (or `none`): no discovery at all.
    Off,
    /// `virtio=blk,rng,net,vsock` (any subset): only these types, each of
    /// which must be found (bit i = `VIRTIO_TYPES[i]`).
    Only(u8),
}

/// The device type names `virtio=` accepts, in bit order of [`VirtioSel::Only`].
pub const VIRTIO_TYPES: [&str; 4] = ["blk", "rng", "net", "vsock"];

/// Most `virtio_mmio.device=` entries kept.
pub const MAX_MMIO: usize = 16;

/// One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioRange {
    pub base: u64,
    pub size: u64,
}

/// Options of the virtio-net test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// `net=echo-peer`: UDP echo through the peer.
    pub echo: bool,
    /// `netip=A.B.C.D` (default 10.0.2.15).
    pub ip: [u8; 4],
    /// `netpeer=A.B.C.D[:PORT]` (default 10.0.2.2:7777).
    pub peer: [u8; 4],
    pub port: u16,
    /// `netburst=N`: then N more UDP datagrams to the peer (0: none).
    pub burst: u32,
}

/// Which benchmark `bench=` asks for (instead of the device's test).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchKind {
    /// No benchmark: every device gets its test.
    None,
    /// `bench=blk`: block throughput and IOPS on the first virtio-blk device.
    Blk,
    /// `bench=net`: UDP transmit, receive and echo rates on the first virtio-net device.
    Net,
}

/// Options of the benchmarks (`bench=`, `qd=`, `benchtime=`, `benchwarm=`, `benchregion=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchOptions {
    pub kind: BenchKind,
    /// `qd=N`: requests (blk) or frames (net transmit) kept in flight (default 32).
    pub qd: u16,
    /// `benchtime=MS`: measured time per workload (default 2000).
    pub time_ms: u64,
    /// `benchwarm=MS`: unmeasured warm-up before each workload (default 200).
    pub warm_ms: u64,
    /// `benchregion=SIZE`: bytes of the disk the block workloads use, from
    /// offset 0 (default: the whole disk).
    pub region: Option<u64>,
}

/// Largest `qd=`.
pub const MAX_QD: u64 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub action: Action,
    /// `work=N`: workload size multiplier (default 1).
    pub work: u64,
    /// `touch=N`: MiB of memory past the work buffers written once before
    /// the action (default 0), a resident set for snapshot and migration
    /// benchmarks.
    pub touch_mib: u64,
    pub virtio: VirtioSel,
    pub net: NetOptions,
    /// `vsock=PORT`: host port the virtio-vsock test connects to.
    pub vsock_port: Option<u32>,
    /// `pcibar=assign`: assign the virtio PCI devices' memory BARs even if
    /// the firmware did (exercises the assignment path).
    pub pci_assign: bool,
    /// `pciwindow=ADDR`: where BAR assignment starts (default 0xe0000000).
    pub pci_window: u64,
    /// `pciecam=ADDR`: ECAM base of PCI bus 0 when there is no MCFG.
    pub pci_ecam: Option<u64>,
    /// `virtio_mmio.device=` entries, in command-line order.
    pub mmio: [MmioRange; MAX_MMIO],
    pub mmio_len: usize,
    pub bench: BenchOptions,
    /// `soakdisk=on`: with `action=soak`, the BSP also writes and checks a
    /// ring of sectors on the first virtio-blk disk (see `virtio/blk.rs`).
    pub soak_disk: bool,
    /// `genid=ADDR`: with `action=soak`, the BSP prints the 16 bytes at this
    /// guest-physical address (a VM generation ID) whenever they change.
    pub genid: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            action: Action::Exit(0),
            work: 1,
            touch_mib: 0,
            virtio: VirtioSel::Default,
            net: NetOptions {
                echo: false,
                ip: [10, 0, 2, 15],
                peer: [10, 0, 2, 2],
                port: 7777,
                burst: 0,
            },
            vsock_port: None,
            pci_assign: false,
            pci_window: 0xe000_0000,
            pci_ecam: None,
            mmio: [MmioRange::default(); MAX_MMIO],
            mmio_len: 0,
            bench: BenchOptions {
                kind: BenchKind::None,
                qd: 32,
                time_ms: 2000,
                warm_ms: 200,
                region: None,
            },
            soak_disk: false,
            genid: None,
        }
    }
}

/// Largest accepted `work=N`.
const MAX_WORK: u64 = 4096;
/// Largest accepted `touch=N` (MiB; the guest only uses RAM below 4 GiB).
const MAX_TOUCH_MIB: u64 = 4096;
/// Largest accepted `netburst=N`.
const MAX_NET_BURST: u64 = 100_000;

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
            } else if let Some(value) = word.strip_prefix(b"touch=") {
                opts.touch_mib = parse_number(value)
                    .filter(|&n| n <= MAX_TOUCH_MIB)
                    .ok_or(word)?;
            } else if let Some(value) = word.strip_prefix(b"virtio=") {
                opts.virtio = parse_virtio(value).ok_or(word)?;
            } else if let Some(value) = word.strip_prefix(b"net=") {
                (value == b"echo-peer").then_some(()).ok_or(word)?;
                opts.net.echo = true;
            } else if let Some(value) = word.strip_prefix(b"netip=") {
                opts.net.ip = parse_ipv4(value).ok_or(word)?;
            } else if let Some(value) = word.strip_prefix(b"netpeer=") {
                let (ip, port) = match value.iter().position(|&b| b == b':') {
                    Some(i) => (&value[..i], Some(&value[i + 1..])),
                    None => (value, None),
                };
                opts.net.peer = parse_ipv4(ip).ok_or(word)?;
                if let Some(port) = port {
                    opts.net.port = parse_number(port)
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|&p| p != 0)
                        .ok_or(word)?;
                }
            } else if let Some(value) = word.strip_prefix(b"netburst=") {
                opts.net.burst = parse_number(value)
                    .filter(|&n| n <= MAX_NET_BURST)
                    .ok_or(word)? as u32;
            } else if let Some(value) = word.strip_prefix(b"soakdisk=") {
                opts.soak_disk = match value {
                    b"on" => true,
                    b"off" => false,
                    _ => return Err(word),
                };
            } else if let Some(value) = word.strip_prefix(b"genid=") {
                // 16 bytes, below 4 GiB (the identity map), 8-byte aligned.
                let addr = parse_number(value)
                    .filter(|&a| a % 8 == 0 && a + 16 <= 1 << 32)
                    .ok_or(word)?;
                opts.genid = Some(addr);
            } else if let Some(value) = word.strip_prefix(b"vsock=") {
                let port = parse_number(value).and_then(|p| u32::try_from(p).ok());
                opts.vsock_port = Some(port.ok_or(word)?);
            } else if let Some(value) = word.strip_prefix(b"pcibar=") {
                (value == b"assign").then_some(()).ok_or(word)?;
                opts.pci_assign = true;
            } else if let Some(value) = word.strip_prefix(b"pciwindow=") {
                opts.pci_window = parse_number(value)
                    .filter(|&a| a % 4096 == 0 && a < 1 << 32)
                    .ok_or(word)?;
            } else if let Some(value) = word.strip_prefix(b"pciecam=") {
                let base = parse_number(value).filter(|&a| a % (1 << 20) == 0 && a < 1 << 32);
                opts.pci_ecam = Some(base.ok_or(word)?);
            } else if let Some(value) = word.strip_prefix(b"bench=") {
                opts.bench.kind = match value {
                    b"blk" => BenchKind::Blk,
                    b"net" => BenchKind::Net,
                    b"off" | b"none" => BenchKind::None,
                    _ => return Err(word),
                };
            } else if let Some(value) = word.strip_prefix(b"qd=") {
                opts.bench.qd = parse_number(value)
                    .filter(|&n| (1..=MAX_QD).contains(&n))
                    .ok_or(word)? as u16;
            } else if let Some(value) = word.strip_prefix(b"benchtime=") {
                opts.bench.time_ms = parse_number(value)
                    .filter(|&n| (1..=3_600_000).contains(&n))
                    .ok_or(word)?;
            } else if let Some(value) = word.strip_prefix(b"benchwarm=") {
                opts.bench.warm_ms = parse_number(value).filter(|&n| n <= 600_000).ok_or(word)?;
            } else if let Some(value) = word.strip_prefix(b"benchregion=") {
                let bytes = parse_size(value).filter(|&n| n >= 1 << 20).ok_or(word)?;
                opts.bench.region = Some(bytes);
            } else if let Some(value) = word.strip_prefix(b"virtio_mmio.device=") {
                let range = parse_mmio(value).ok_or(word)?;
                if opts.mmio_len < MAX_MMIO {
                    opts.mmio[opts.mmio_len] = range;
                    opts.mmio_len += 1;
                }
            }
        }
        Ok(opts)
    }

    /// The `virtio_mmio.device=` entries.
    pub fn mmio(&self) -> &[MmioRange] {
        &self.mmio[..self.mmio_len]
    }
}

/// `all`, `off`/`none`, or a comma-separated subset of [`VIRTIO_TYPES`].
fn parse_virtio(value: &[u8]) -> Option<VirtioSel> {
    match value {
        b"all" => return Some(VirtioSel::All),
        b"off" | b"none" => return Some(VirtioSel::Off),
        _ => {}
    }
    let mut mask = 0u8;
    for item in value.split(|&b| b == b',') {
        let bit = VIRTIO_TYPES.iter().position(|t| t.as_bytes() == item)?;
        mask |= 1 << bit;
    }
    Some(VirtioSel::Only(mask))
}

/// Dotted-quad IPv4 address.
fn parse_ipv4(text: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for byte in ip.iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *byte = u8::try_from(parse_number(part)?).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// Linux's `<size>@<baseaddr>:<irq>[:<id>]`; size and base are numbers with
/// an optional K/M/G suffix (Linux's `memparse`).
fn parse_mmio(value: &[u8]) -> Option<MmioRange> {
    let at = value.iter().position(|&b| b == b'@')?;
    let size = parse_size(&value[..at])?;
    let mut rest = value[at + 1..].split(|&b| b == b':');
    let base = parse_size(rest.next()?)?;
    let irq = rest.next()?;
    parse_number(irq)?;
    if let Some(id) = rest.next() {
        parse_number(id)?;
    }
    if rest.next().is_some() || size == 0 {
        return None;
    }
    Some(MmioRange { base, size })
}

/// A number with an optional K, M or G (binary) suffix.
fn parse_size(text: &[u8]) -> Option<u64> {
    let (digits, shift) = match text.last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n = parse_number(digits)?;
    (n.leading_zeros() >= shift).then_some(n << shift)
}

fn parse_action(value: &[u8]) -> Option<Action> {
    Some(match value {
        b"poweroff" => Action::Poweroff,
        b"reboot" => Action::Reboot,
        b"triplefault" => Action::TripleFault,
        b"hold" => Action::Hold,
        b"idle" => Action::Idle,
        b"fault" => Action::Fault,
        b"soak" => Action::Soak,
        b"exit" => Action::Exit(0),
        _ => {
            let status = parse_number(value.strip_prefix(b"exit:")?)?;
            Action::Exit(u8::try_from(status).ok()?)
        }
    })
}

/// A decimal or `0x` hexadecimal number.
pub(crate) fn parse_number(text: &[u8]) -> Option<u64> {
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
