//! The VM's virtio devices: backends opened from the configuration, each behind a
//! virtio-mmio transport with its own register window, interrupt line and queue ioeventfds,
//! announced to the guest through ACPI and the kernel command line.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arch::acpi::MmioDevice;
use arch::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_IRQS, VIRTIO_MMIO_SIZE};
use block::DiskBackend;
use devices::virtio::balloon::{Balloon, BalloonHandle, BalloonOptions, DiscardMemory};
use devices::virtio::block::{Block, BlockCounters, BlockOptions};
use devices::virtio::console::{Console, ConsoleBackend};
use devices::virtio::mmio::{cmdline_device, MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::virtio::net::{Net, NetCounters};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use devices::{Bus, Interrupt};
use guestmem::GuestMem;
use hypervisor::IoSpace;

use crate::config::{
    Balloon as BalloonSpec, CacheMode, ConsoleConfig, Disk, NetBinding, Nic, VmConfig,
};

/// Errors setting up virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk {path}: {source}")]
    Disk {
        path: String,
        #[source]
        source: block::Error,
    },
    #[error("disk {path}: {source}")]
    Block {
        path: String,
        #[source]
        source: devices::virtio::block::BlockError,
    },
    #[error("network device on {binding}: {source}")]
    Net {
        binding: String,
        #[source]
        source: devices::virtio::net::NetError,
    },
    #[error(
        "network device {0}: its passt was not started (`vessel run` starts passt for --net \
         passt; a VM restored or received through the API needs socket=PATH of a passt started \
         beforehand, `passt --socket PATH`)"
    )]
    PasstNotStarted(usize),
    #[error("virtio-console: {0}")]
    Console(#[from] devices::virtio::console::ConsoleError),
    #[error("virtio-balloon: {0}")]
    Balloon(#[from] devices::virtio::balloon::BalloonError),
    #[error("virtio-vsock: {0}")]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    #[error("virtio-mmio transport: {0}")]
    Transport(#[from] devices::virtio::mmio::MmioError),
    #[error(transparent)]
    Pci(#[from] crate::pci::Error),
    #[error(transparent)]
    Kvm(#[from] hypervisor::Error),
    #[error("virtio device placement: {0}")]
    Bus(#[from] devices::BusError),
}

/// A disk whose flushes are dropped (`cache=unsafe`).
pub(crate) struct NoFlush(pub(crate) Box<dyn DiskBackend>);

impl DiskBackend for NoFlush {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> block::Result<()> {
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> block::Result<()> {
        self.0.write_at(buf, off)
    }
    fn flush(&self) -> block::Result<()> {
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> block::Result<()> {
        self.0.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> block::Result<()> {
        self.0.write_zeroes(off, len)
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn format(&self) -> block::Format {
        self.0.format()
    }
    fn raw_file(&self) -> Option<block::RawFile> {
        self.0
            .raw_file()
            .map(|f| block::RawFile { flush: false, ..f })
    }
    fn release_locks(&self) {
        self.0.release_locks()
    }
    fn retake_locks(&self) -> block::Result<()> {
        self.0.retake_locks()
    }
}

/// A block device for `d` on the image `file`, its images locked; a dirty image is repaired
/// unless `repair` is false (disks handed over by a migration's source).
fn block_device(d: &Disk, file: &Path, repair: bool) -> Result<Block, Error> {
    let path = file.display().to_string();
    let opts = block::OpenOptions {
        read_only: d.read_only,
        direct: d.cache == CacheMode::None,
        lock: true,
        repair_dirty: repair,
        ..Default::default()
    };
    let disk = block::open(file, opts).map_err(|source| Error::Disk {
        path: path.clone(),
        source,
    })?;
    let disk_format = disk.format();
    let disk: Arc<dyn DiskBackend> = match d.cache {
        CacheMode::Writeback | CacheMode::None => Arc::from(disk),
        CacheMode::Unsafe => Arc::new(NoFlush(disk)),
    };
    let opts = BlockOptions {
        serial: d.serial.clone().unwrap_or_default(),
        num_queues: d.queues,
        engine: d.engine,
        rate_limit: d.rate_limit,
        ..Default::default()
    };
    let block = Block::new(disk, opts).map_err(|source| Error::Block {
        path: path.clone(),
        source,
    })?;
    let engine = block.engine();
    tracing::debug!(
        "disk {path}: {}, engine {engine} (asked: {}), cache {}{}",
        block::Format::as_str(disk_format),
        d.engine,
        d.cache.as_str(),
        if d.rate_limit.is_unlimited() {
            ""
        } else {
            ", rate limited"
        }
    );
    Ok(block)
}

/// Network device `index` on its binding: a tap opened (or created) now, or a stream socket
/// connected now (its own, or the passt's `vessel run` started).
fn net_device(index: usize, n: &Nic, binding: &NetBinding) -> Result<Net, Error> {
    match binding {
        NetBinding::Tap(tap) => Net::with_tap(tap, n.mac, n.queues),
        NetBinding::Socket(path) => Net::with_stream(path, n.mac),
        NetBinding::Passt(p) => match &p.socket {
            Some(path) => Net::with_stream(path, n.mac),
            None => return Err(Error::PasstNotStarted(index)),
        },
    }
    .and_then(|mut d| {
        d.set_rate_limiters(n.rx_limit, n.tx_limit)?;
        Ok(d)
    })
    .map_err(|source| Error::Net {
        binding: match binding.stream_path() {
            Some(path) if matches!(binding, NetBinding::Passt(_)) => {
                format!("passt (socket {})", path.display())
            }
            _ => binding.describe(),
        },
        source,
    })
}

fn vsock_device(cid: u64, socket: &Path) -> Result<Box<dyn VirtioDevice>, Error> {
    Ok(Box::new(Vsock::new(cid, socket)?))
}

/// A virtio console on the same kinds of host backends as the serial console (without raw
/// terminal mode: `--virtio-console stdio` is for piped or line-mode use).
fn virtio_console_device(c: &ConsoleConfig) -> Result<Box<dyn VirtioDevice>, Error> {
    let backend = match c {
        ConsoleConfig::Stdio => ConsoleBackend::stdio()?,
        ConsoleConfig::File(p) => ConsoleBackend::file(p)?,
        ConsoleConfig::Socket(p) => ConsoleBackend::socket(p)?,
        ConsoleConfig::Off => ConsoleBackend::off(),
    };
    Ok(Box::new(Console::new(backend)?))
}

/// Gives discarded guest pages back to the host (`madvise`, in the hypervisor crate).
pub struct HostDiscard;

impl DiscardMemory for HostDiscard {
    fn discard(
        &self,
        mem: &GuestMem,
        addr: vm_memory::GuestAddress,
        len: u64,
    ) -> std::io::Result<()> {
        hypervisor::mem::discard(mem, addr, len).map_err(std::io::Error::other)
    }
}

/// A balloon on the host's memory, and the handle the VMM keeps.
pub fn balloon_device(b: &BalloonSpec) -> Result<(Balloon, BalloonHandle), Error> {
    let opts = BalloonOptions {
        target: b.size,
        stats: b.stats,
        free_page_reporting: b.free_page_reporting,
        deflate_on_oom: b.deflate_on_oom,
    };
    let balloon = Balloon::new(opts, Arc::new(HostDiscard))?;
    let handle = balloon.handle();
    Ok((balloon, handle))
}

/// The virtio devices of a VM, as placed.
#[derive(Default)]
pub struct VirtioDevices {
    /// For the DSDT.
    pub acpi: Vec<MmioDevice>,
    /// `virtio_mmio.device=` parameters for the kernel command line.
    pub cmdline: Vec<String>,
    /// The transports, for snapshots and hot-plug later.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// With `--transport pci`: the PCI host and its virtio-pci functions (and no MMIO
    /// transports).
    pub pci: Option<crate::pci::PciHost>,
    /// The balloon's handle (target, statistics), for the API later.
    pub balloon: Option<BalloonHandle>,
    /// Each disk's counters, in configuration order (read by the API without touching the
    /// devices).
    pub disk_counters: Vec<Arc<BlockCounters>>,
    /// Each network device's counters, in configuration order.
    pub nic_counters: Vec<Arc<NetCounters>>,
}

impl VirtioDevices {
    /// A machine reset: every device stops and waits for a driver again; PCI functions get
    /// their power-on configuration space back.
    pub fn reset_all(&self) {
        for t in &self.transports {
            devices::bus::lock(t).hard_reset();
        }
        if let Some(pci) = &self.pci {
            pci.reset_all();
        }
    }
}

/// Opens every configured device's backend and places it on the MMIO bus.
pub fn setup(
    vm: &hypervisor::Vm,
    mem: &GuestMem,
    mmio: &mut Bus,
    config: &VmConfig,
) -> Result<VirtioDevices, Error> {
    let (spec, host) = (&config.spec, &config.bindings);
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let (mut disk_counters, mut nic_counters) = (Vec::new(), Vec::new());
    // The configuration was validated: every device has its binding.
    for (d, file) in spec.disks.iter().zip(&host.disks) {
        let block = block_device(d, file, !config.handed_over_disks)?;
        disk_counters.push(block.counters());
        devices.push(Box::new(block));
    }
    for (i, (n, binding)) in spec.nets.iter().zip(&host.nets).enumerate() {
        let net = net_device(i, n, binding)?;
        nic_counters.push(net.counters());
        devices.push(Box::new(net));
    }
    if spec.rng {
        devices.push(Box::new(Rng::new()));
    }
    if let (Some(v), Some(socket)) = (&spec.vsock, &host.vsock_socket) {
        devices.push(vsock_device(v.cid, socket)?);
    }
    if spec.virtio_console {
        let off = ConsoleConfig::Off;
        devices.push(virtio_console_device(
            host.virtio_console.as_ref().unwrap_or(&off),
        )?);
    }
    let mut balloon = None;
    if let Some(b) = &spec.balloon {
        let (device, handle) = balloon_device(b)?;
        devices.push(Box::new(device));
        balloon = Some(handle);
    }
    let mut out = VirtioDevices {
        balloon,
        disk_counters,
        nic_counters,
        ..Default::default()
    };
    if spec.transport == crate::config::Transport::Pci {
        out.pci = Some(crate::pci::setup(vm, mem, mmio, devices)?);
        return Ok(out);
    }
    // The configuration was validated: there is an interrupt line for every device.
    for ((i, device), irq) in devices.into_iter().enumerate().zip(VIRTIO_MMIO_IRQS) {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let line: Arc<dyn Interrupt> = Arc::new(vm.irq_line(irq)?.event);
        let transport = MmioTransport::new(mem.clone(), line, device)?;
        for (q, fd) in transport.queue_notifiers().iter().enumerate() {
            vm.register_ioevent(
                fd,
                IoSpace::Mmio,
                base + QUEUE_NOTIFY_OFFSET,
                Some(q as u32),
            )?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        out.acpi.push(MmioDevice {
            base,
            size: VIRTIO_MMIO_SIZE,
            irq,
        });
        out.cmdline.push(cmdline_device(base, irq));
        out.transports.push(transport);
    }
    Ok(out)
}
