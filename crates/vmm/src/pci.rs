//! The PCI side of the VM: bus 0 with a host bridge, configuration mechanism #1 and ECAM, the
//! PCI MMIO window, and virtio devices as virtio-pci functions whose MSI-X vectors are KVM MSI
//! routes with irqfds and whose queue notifications are ioeventfds that follow their BAR.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use arch::acpi::PciHostBridge;
use arch::layout::{PCI_ECAM_BASE, PCI_ECAM_SIZE, PCI_MAX_DEVICES, PCI_MMIO_BASE, PCI_MMIO_END};
use devices::pci::config::COMMAND_MEMORY;
use devices::pci::msix::{MsiMessage, MsiVectors};
use devices::pci::{BarObserver, PciConfigIo, PciDevice, PciEcam, PciRoot, PciWindow};
use devices::virtio::pci::{notify_address, VirtioPciDevice, VIRTIO_BAR};
use devices::virtio::VirtioDevice;
use devices::Bus;
use guestmem::GuestMem;
use hypervisor::{IoSpace, MsiRouter, MsiVector};
use vmm_sys_util::eventfd::EventFd;

/// Errors setting up PCI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too many PCI devices: {0} (bus 0 has room for {PCI_MAX_DEVICES})")]
    TooManyDevices(usize),
    #[error("no room for a {0:#x}-byte BAR in the PCI MMIO window")]
    NoBarSpace(u64),
    #[error("PCI: {0}")]
    Pci(#[from] devices::pci::PciError),
    #[error("virtio-pci transport: {0}")]
    Transport(#[from] devices::virtio::pci::VirtioPciError),
    #[error(transparent)]
    Kvm(#[from] hypervisor::Error),
    #[error("PCI placement: {0}")]
    Bus(#[from] devices::BusError),
    #[error("cannot duplicate a queue eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("cannot start an INTx resample thread: {0}")]
    Thread(#[source] io::Error),
}

/// A function's MSI-X vectors as KVM GSIs: routes re-programmed on demand, raised by irqfd.
struct KvmVectors {
    router: Arc<MsiRouter>,
    vectors: Vec<MsiVector>,
}

impl MsiVectors for KvmVectors {
    fn trigger(&self, vector: u16) -> io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some(v) => v.event.write(1),
            None => Ok(()),
        }
    }

    fn program(&self, vector: u16, msg: MsiMessage) -> io::Result<()> {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            return Ok(());
        };
        self.router
            .set_route(v.gsi, msg.address, msg.data)
            .map_err(io::Error::other)
    }
}

/// Moves the queue-notify ioeventfds of virtio functions with their BAR.
struct NotifyMover {
    vm: hypervisor::Vm,
    notifiers: Mutex<HashMap<u8, Vec<EventFd>>>,
}

impl BarObserver for NotifyMover {
    fn bar_moved(&self, slot: u8, bar: usize, _size: u64, old: Option<u64>, new: Option<u64>) {
        if bar != VIRTIO_BAR {
            return;
        }
        let map = devices::bus::lock(&self.notifiers);
        let Some(fds) = map.get(&slot) else {
            return;
        };
        for (q, fd) in fds.iter().enumerate() {
            let q = q as u16;
            if let Some(a) = old {
                if let Err(e) =
                    self.vm
                        .unregister_ioevent(fd, IoSpace::Mmio, notify_address(a, q), None)
                {
                    tracing::warn!("pci 00:{slot:02x}.0 queue {q}: {e}");
                }
            }
            if let Some(a) = new {
                if let Err(e) =
                    self.vm
                        .register_ioevent(fd, IoSpace::Mmio, notify_address(a, q), None)
                {
                    tracing::warn!("pci 00:{slot:02x}.0 queue {q}: {e} (notifications will exit)");
                }
            }
        }
        tracing::debug!("pci 00:{slot:02x}.0: BAR {bar} {old:x?} -> {new:x?}");
    }
}

/// Waits for the guest's EOIs of a function's INTx line. The thread blocks in `read` for the
/// life of the process (the VM's lines are never torn down before it exits).
fn spawn_resampler(
    slot: u8,
    resample: EventFd,
    intx: devices::virtio::pci::IntxHandle,
) -> Result<(), Error> {
    jail::seccomp::spawn(
        jail::seccomp::ThreadClass::Device,
        format!("vessel-intx-{slot:02x}"),
        move || {
            while resample.read().is_ok() {
                intx.resampled();
            }
        },
    )
    .map(|_| ())
    .map_err(Error::Thread)
}

/// Hands out BAR addresses from the PCI MMIO window, each aligned to its size.
struct BarAllocator {
    next: u64,
}

impl BarAllocator {
    fn alloc(&mut self, size: u64) -> Result<u64, Error> {
        let addr = self
            .next
            .checked_next_multiple_of(size)
            .ok_or(Error::NoBarSpace(size))?;
        let end = addr.checked_add(size).ok_or(Error::NoBarSpace(size))?;
        if end > PCI_MMIO_END {
            return Err(Error::NoBarSpace(size));
        }
        self.next = end;
        Ok(addr)
    }
}

/// The VM's PCI host: keep it alive with the VM.
pub struct PciHost {
    pub root: Arc<Mutex<PciRoot>>,
    /// Configuration mechanism #1, for the port bus at [`devices::pci::PCI_CONFIG_IO_PORT`].
    pub config_io: Arc<Mutex<PciConfigIo>>,
    /// What the ACPI tables announce.
    pub acpi: PciHostBridge,
    /// The virtio functions, in slot order from 1.
    pub transports: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// Each function's slot and configuration space as the firmware left it, for a reset.
    power_on: Vec<(u8, Vec<u8>)>,
}

/// Capability ID of MSI-X.
const CAP_ID_MSIX: u8 = 0x11;
/// Configuration space read back at power-on and written again on reset.
const CONFIG_SPACE: usize = 256;

impl PciHost {
    /// Maps each function's BARs where its (restored) configuration space puts them, moving
    /// the queue ioeventfds along.
    pub fn remap_bars(&self) {
        devices::bus::lock(&self.root).refresh_mappings();
    }

    /// A machine reset: each function stops its device, and its command register, BARs and
    /// MSI-X enable go back to what the firmware set (through the root, which moves the BAR
    /// mappings and queue ioeventfds).
    pub fn reset_all(&self) {
        for t in &self.transports {
            devices::bus::lock(t).hard_reset();
        }
        let mut root = devices::bus::lock(&self.root);
        for (slot, cfg) in &self.power_on {
            let dword = |off: usize| &cfg[off..off + 4];
            // Decoding off first, so that the BARs move while unmapped.
            root.config_write(0, *slot, 0, 4, &[0, 0]);
            for off in (0x10..0x28).step_by(4) {
                root.config_write(0, *slot, 0, off, dword(off));
            }
            if let Some(cap) = find_capability(cfg, CAP_ID_MSIX) {
                // Message control: MSI-X disabled, function unmasked.
                root.config_write(0, *slot, 0, cap + 2, &[0, 0]);
            }
            root.config_write(0, *slot, 0, 4, &cfg[4..6]);
        }
    }
}

/// The offset of capability `id` in a configuration space, following the list from 0x34.
fn find_capability(cfg: &[u8], id: u8) -> Option<usize> {
    let mut at = usize::from(cfg[0x34] & !3);
    for _ in 0..48 {
        if at < 0x40 || at + 2 > cfg.len() {
            return None;
        }
        if cfg[at] == id {
            return Some(at);
        }
        at = usize::from(cfg[at + 1] & !3);
    }
    None
}

/// Builds bus 0 with `devices` in slots 1, 2, ... as virtio-pci functions; puts ECAM and the PCI
/// MMIO window on `mmio`.
pub fn setup(
    vm: &hypervisor::Vm,
    mem: &GuestMem,
    mmio: &mut Bus,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<PciHost, Error> {
    if devices.len() > PCI_MAX_DEVICES {
        return Err(Error::TooManyDevices(devices.len()));
    }
    let window = PciWindow::new(PCI_MMIO_BASE, PCI_MMIO_END - PCI_MMIO_BASE);
    let mut root = PciRoot::new(window.clone());
    let mover = Arc::new(NotifyMover {
        vm: vm.clone(),
        notifiers: Mutex::new(HashMap::new()),
    });
    root.set_observer(mover.clone());
    let router = MsiRouter::new(vm);
    let mut bars = BarAllocator {
        next: PCI_MMIO_BASE,
    };
    let mut transports = Vec::new();
    for device in devices {
        let slot = root
            .free_slot()
            .ok_or(Error::TooManyDevices(PCI_MAX_DEVICES + 1))?;
        let count = VirtioPciDevice::vector_count(device.queue_max_sizes().len());
        let vectors = (0..count)
            .map(|_| router.add_vector())
            .collect::<Result<Vec<_>, _>>()?;
        let vectors = Arc::new(KvmVectors {
            router: router.clone(),
            vectors,
        });
        // INTx for guests without MSI-X: a level-triggered line, re-asserted after each EOI
        // while the ISR says an interrupt is pending.
        let gsi = arch::layout::pci_intx_gsi(slot);
        let level = vm.level_irq_line(gsi)?;
        let trigger: Arc<dyn devices::Interrupt> = Arc::new(level.trigger);
        let t = VirtioPciDevice::new(mem.clone(), device, vectors, Some(trigger))?;
        spawn_resampler(slot, level.resample, t.intx_handle())?;
        let mut t = t;
        // The firmware's part: BARs assigned and memory decoding on.
        let sizes: Vec<(usize, u64)> = t.config().bars().collect();
        for (bar, size) in sizes {
            let addr = bars.alloc(size)?;
            t.config_mut().set_bar_addr(bar, addr)?;
        }
        t.config_mut().set_command(COMMAND_MEMORY);
        let fds = t
            .queue_notifiers()
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::EventFd)?;
        devices::bus::lock(&mover.notifiers).insert(slot, fds);
        let t = Arc::new(Mutex::new(t));
        root.add_device(slot, t.clone())?;
        tracing::debug!(
            "pci 00:{slot:02x}.0: virtio type {} BAR at {:#x?}",
            devices::bus::lock(&t).device().device_type(),
            root.bar_mapping(slot, VIRTIO_BAR)
        );
        transports.push(t);
    }
    let power_on = (1..=transports.len() as u8)
        .map(|slot| {
            let mut cfg = vec![0u8; CONFIG_SPACE];
            for off in (0..CONFIG_SPACE).step_by(4) {
                root.config_read(0, slot, 0, off, &mut cfg[off..off + 4]);
            }
            (slot, cfg)
        })
        .collect();
    let root = Arc::new(Mutex::new(root));
    mmio.insert(
        Arc::new(Mutex::new(PciEcam::new(root.clone()))),
        PCI_ECAM_BASE,
        PCI_ECAM_SIZE,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(window)),
        PCI_MMIO_BASE,
        PCI_MMIO_END - PCI_MMIO_BASE,
    )?;
    Ok(PciHost {
        config_io: Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        root,
        acpi: PciHostBridge::standard(),
        transports,
        power_on,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_aligned_and_stay_in_the_window() {
        let mut a = BarAllocator {
            next: PCI_MMIO_BASE,
        };
        assert_eq!(a.alloc(0x1000).unwrap(), PCI_MMIO_BASE);
        // Aligned to its size.
        assert_eq!(a.alloc(0x8000).unwrap(), PCI_MMIO_BASE + 0x8000);
        assert_eq!(a.alloc(0x1000).unwrap(), PCI_MMIO_BASE + 0x10000);
        assert!(matches!(a.alloc(1 << 30), Err(Error::NoBarSpace(_))));
        let mut full = BarAllocator {
            next: PCI_MMIO_END - 0x1000,
        };
        assert!(full.alloc(0x1000).is_ok());
        assert!(full.alloc(0x1000).is_err());
    }
}
