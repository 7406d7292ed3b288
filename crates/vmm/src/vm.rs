//! Building a VM from a [`VmConfig`] and running it to the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::acpi;
use arch::boot::{self, BootEntry, KernelSpec};
use arch::cpuid::{self, Topology};
use arch::layout;
use arch::regs;
use arch::template::CpuTemplate;
use devices::legacy::{AcpiPm, BootMarker, Cmos, ExitDevice, Serial, SerialInput, I8042};
use devices::{Bus, BusDevice, Interrupt, VmEvent, VmEventSink};
use guestmem::GuestMem;
use hypervisor::Hypervisor;

use crate::config::{KernelSource, OnReboot, VmConfig};
use crate::console::Console;
use crate::control::{Control, RunState};
use crate::exit::ExitReason;
use crate::session::{ApiSwitch, Ended};
use crate::vcpu::{self, VcpuContext, VcpuHandle};

/// Host-side settings of a VM restored from a snapshot (the machine comes from the snapshot).
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub memory: api::types::RestoreMemory,
    pub console: crate::config::ConsoleConfig,
    pub api_socket: Option<PathBuf>,
    /// New backends (and MACs, limits) for the network devices, all or none (clones): taps,
    /// stream sockets, passt (started by the caller: its socket set).
    pub nets: Vec<(crate::config::Nic, crate::config::NetBinding)>,
    /// A new socket (and guest CID) for the vsock device (clones).
    pub vsock: Option<(crate::config::Vsock, PathBuf)>,
}

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] hypervisor::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Template(#[from] arch::template::Error),
    #[error("cannot allocate {size} MiB of guest memory: {reason}")]
    Memory { size: u64, reason: String },
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    MpTable(#[from] arch::mptable::Error),
    #[error(transparent)]
    Console(#[from] crate::console::Error),
    #[error("device setup: {0}")]
    Bus(#[from] devices::BusError),
    #[error(transparent)]
    Virtio(#[from] crate::virtio::Error),
    #[error("control API: {0}")]
    Api(#[from] api::server::ServeError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Seccomp(#[from] jail::seccomp::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the VM could not start because of what it was asked to be or to use: a
    /// value, or a file (kernel, initrd, disk, snapshot, socket path) that cannot serve;
    /// exit code 2, where a failure of the host or of Vessel itself is 1.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::Template(_)
                | Error::Boot(_)
                | Error::Console(_)
                | Error::Virtio(_)
                | Error::Api(_)
                | Error::Snapshot(_)
        )
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// The parts of a VM that a snapshot saves and a restore rebuilds. Shared with the control
/// API, whose thread takes snapshots while the vCPUs are parked.
pub struct Machine {
    pub(crate) config: VmConfig,
    // Fields drop in order: the VM goes first, then the guest memory its slots point into
    // (unmapping memory under a live VM would make KVM invalidate every mapping first).
    pub(crate) vm_fd: hypervisor::Vm,
    pub(crate) mem: GuestMem,
    pub(crate) vcpus: Vec<vcpu::SharedVcpu>,
    /// Each vCPU's exits, counted by its threads (one after another across guest reboots).
    pub(crate) vcpu_counters: Vec<Arc<vcpu::VcpuCounters>>,
    pub(crate) virtio: crate::virtio::VirtioDevices,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) cmos: Arc<Mutex<Cmos>>,
    pub(crate) acpi_pm: Arc<Mutex<AcpiPm>>,
    /// The MSRs a snapshot saves.
    pub(crate) msr_indices: Vec<u32>,
    /// The dirty page logs and who reads them.
    pub(crate) dirty: crate::dirty::DirtyTracker,
    /// The snapshot a diff snapshot builds on: the last one taken, or the one this VM was
    /// restored from.
    pub(crate) snapshot_base: Mutex<Option<crate::snapshot::SnapshotBase>>,
    /// Each disk's image now: a disk snapshot moves the VM to a new overlay.
    pub(crate) disk_paths: Mutex<Vec<PathBuf>>,
    /// Serves guest memory's missing pages (a userfaultfd restore). Last: it must outlive
    /// everything that may touch guest memory, device threads included.
    pub(crate) pager: Option<crate::snapshot::pager::Pager>,
}

impl Machine {
    /// The configuration, with each disk's image as it is now.
    pub(crate) fn config_now(&self) -> VmConfig {
        let mut c = self.config.clone();
        c.bindings.disks = devices::bus::lock(&self.disk_paths).clone();
        c
    }
}

/// A VM that is built and ready to run.
pub struct Vm {
    machine: Arc<Machine>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    control: Arc<Control>,
    console: Console,
    boot_marker: Arc<Mutex<BootMarker>>,
    started: Instant,
    /// Where the kernel was entered (none for a restored VM).
    pub boot: Option<BootEntry>,
    /// The vCPUs and irqchip as they were before the first instruction, for a guest reset.
    power_on: Option<PowerOn>,
    /// Loaded from a snapshot: the devices start when the vCPUs do.
    restored: bool,
    /// Restored from a snapshot with a new VM generation ID: the guest is notified when the
    /// VM starts (a migrated VM keeps its ID).
    new_generation: bool,
    /// How the migration that brought this VM here went (shown by the API afterwards).
    incoming: Option<Arc<crate::migration::Outgoing>>,
}

/// What a reset restores.
struct PowerOn {
    vm: hypervisor::VmState,
    vcpus: Vec<hypervisor::VcpuState>,
}

/// Writes a new random VM generation ID into guest memory (see `arch::acpi`).
fn write_generation_id(mem: &GuestMem) -> Result<(), Error> {
    let mut id = [0u8; acpi::VMGENID_LEN];
    jail::random::fill(&mut id).map_err(io("cannot read a random VM generation ID"))?;
    acpi::write_vm_generation_id(mem, &id)?;
    tracing::debug!("VM generation ID {}", hex(&id));
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An in-memory kernel staged for the loader in an anonymous file (memfd), named by its
/// /proc/self/fd path: nothing is written to the host's file system, which a jailed VMM
/// cannot write anyway.
struct TempKernel {
    _file: std::fs::File,
    path: PathBuf,
}

impl TempKernel {
    fn new(name: &str, bytes: &[u8]) -> std::io::Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let cname = std::ffi::CString::new(format!("vessel-{name}"))
            .map_err(|_| std::io::Error::other("NUL in a kernel name"))?;
        // SAFETY: memfd_create reads a NUL-terminated name that lives through the call.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        std::io::Write::write_all(&mut f, bytes)?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        Ok(TempKernel { _file: f, path })
    }
}

/// The KVM half of a machine: the VM with its irqchip, timers and memory slots, and its vCPUs
/// (CPUID, MSRs, LAPIC wiring and FPU as at power-on). It depends only on the CPUs, memory and
/// CPU template of the configuration, so a migration target builds it while the pages arrive
/// instead of in the downtime (registering 1 GiB with KVM alone can take milliseconds).
pub(crate) struct KvmMachine {
    vm: hypervisor::Vm,
    vcpus: Vec<Arc<Mutex<hypervisor::Vcpu>>>,
    msr_indices: Vec<u32>,
    max_vcpus: u32,
    /// What it was built for.
    cpus: u32,
    memory: u64,
    template: CpuTemplate,
}

/// The CPU template `config`'s spec names (none: the host's CPU).
fn template(config: &VmConfig) -> Result<CpuTemplate, arch::template::Error> {
    match config.spec.cpu_template.as_str() {
        "" => Ok(CpuTemplate::default()),
        t => CpuTemplate::parse(t),
    }
}

impl KvmMachine {
    /// Builds the KVM half of `config` on `mem`.
    pub(crate) fn build(config: &VmConfig, mem: &GuestMem) -> Result<KvmMachine, Error> {
        let hv = Hypervisor::new()?;
        let max_vcpus = hv.max_vcpus() as u32;
        config.validate_machine(max_vcpus, crate::config::host_memory())?;
        let tsc_deadline = hv
            .info()
            .caps
            .iter()
            .any(|(n, ok)| *n == "TSC_DEADLINE_TIMER" && *ok);
        let mut base_cpuid = hv.supported_cpuid()?;
        template(config)?.apply(&mut base_cpuid)?;
        let msr_list = hv.msr_index_list()?;
        let msr_indices = hv.msrs_to_save()?;

        let vm = hv.create_vm()?;
        vm.setup_irqchip_and_timers()?;
        vm.register_memory(mem)?;

        let topo = Topology {
            cpus: config.spec.cpus,
            tsc_deadline,
        };
        let msrs = regs::boot_msrs(&msr_list);
        let mut vcpus = Vec::with_capacity(config.spec.cpus as usize);
        for id in 0..config.spec.cpus {
            let vcpu = vm.create_vcpu(u64::from(id))?;
            vcpu.set_cpuid(&cpuid::for_vcpu(&base_cpuid, id, topo))?;
            vcpu.set_msrs(&msrs)?;
            let mut lapic = vcpu.lapic()?;
            regs::set_lint(&mut lapic);
            vcpu.set_lapic(&lapic)?;
            vcpu.set_fpu(&regs::boot_fpu())?;
            vcpus.push(Arc::new(Mutex::new(vcpu)));
        }
        Ok(KvmMachine {
            vm,
            vcpus,
            msr_indices,
            max_vcpus,
            cpus: config.spec.cpus,
            memory: config.spec.memory,
            template: template(config)?,
        })
    }

    /// Whether it was built for `config`'s CPUs, memory and CPU template.
    fn fits(&self, config: &VmConfig) -> bool {
        self.cpus == config.spec.cpus
            && self.memory == config.spec.memory
            && template(config).is_ok_and(|t| t == self.template)
    }
}

impl Vm {
    /// Builds the VM: memory, irqchip, devices, kernel, tables and configured vCPUs.
    /// `start` is when the process started (for the boot-time marker).
    pub fn build(config: VmConfig, start: Instant) -> Result<Vm, Error> {
        let mem = GuestMem::from_ranges(&layout::ram_ranges(config.spec.memory)).map_err(|e| {
            Error::Memory {
                size: config.spec.memory >> 20,
                reason: e.to_string(),
            }
        })?;
        // `--thp off` rules huge pages out even where the host's THP is `always`.
        if !hypervisor::mem::advise_hugepages(&mem, config.spec.thp) && config.spec.thp {
            tracing::debug!("no transparent huge pages for guest memory: small pages it is");
        }
        let mut vm = Vm::create(config, mem, None, start)?;
        vm.load_boot()?;
        Ok(vm)
    }

    /// Records how the migration that brought this VM here went.
    pub fn set_incoming_migration(&mut self, status: api::types::MigrationStatus) {
        match &self.incoming {
            // A post-copy migration goes on: its status is live.
            Some(_) => {}
            None => {
                let out = crate::migration::Outgoing::default();
                *devices::bus::lock(&out.status) = status;
                self.incoming = Some(Arc::new(out));
            }
        }
    }

    /// The live status of a post-copy migration still bringing memory in.
    pub(crate) fn set_incoming_live(&mut self, status: Arc<crate::migration::Outgoing>) {
        self.incoming = Some(status);
    }

    /// Rebuilds the VM saved in the snapshot directory `dir`, ready to run from where it was.
    pub fn restore(
        dir: &std::path::Path,
        opts: RestoreOptions,
        start: Instant,
    ) -> Result<Vm, Error> {
        use crate::snapshot::{format, memory, SnapshotError, VmSnapshot, STATE_FILE};
        let (mut snap, lineage): (VmSnapshot, format::Lineage) =
            format::read_state_lineage(&dir.join(STATE_FILE)).map_err(SnapshotError::from)?;
        snap.rebind(&opts.nets, opts.vsock.as_ref())?;
        let hv = Hypervisor::new()?;
        crate::snapshot::check_cpu(&hv.offered_cpuid()?, &snap)?;
        let want: Vec<(u64, u64)> = layout::ram_ranges(snap.config.spec.memory)
            .iter()
            .map(|(a, s)| (a.0, *s as u64))
            .collect();
        let have: Vec<(u64, u64)> = snap.memory.iter().map(|r| (r.guest_addr, r.size)).collect();
        if want != have {
            return Err(SnapshotError::Mismatch(format!(
                "memory regions {have:x?} where {} MiB of RAM has {want:x?}",
                snap.config.spec.memory >> 20
            ))
            .into());
        }
        let files = crate::snapshot::resolve_chain(dir, &lineage, &snap.memory)?;
        let (mem, pager) = match opts.memory {
            api::types::RestoreMemory::Userfaultfd => {
                let (mem, pager) = crate::snapshot::pager::Pager::start(&files, &snap.memory)
                    .map_err(SnapshotError::from)?;
                (mem, Some(pager))
            }
            mode => (
                memory::map_memory_chain(&files, &snap.memory, mode)
                    .map_err(SnapshotError::from)?,
                None,
            ),
        };
        // A disk snapshot: a fresh overlay on each frozen image, for this VM alone.
        let overlays =
            crate::snapshot::disks::prepare_restore(&snap.frozen_disks, &mut snap.config, dir)
                .map_err(SnapshotError::from)?;
        let mut config = snap.config.clone();
        config.bindings.console = Some(opts.console);
        config.bindings.api_socket = opts.api_socket;
        // Nothing to boot again: a reset of a restored VM ends it.
        config.spec.on_reboot = crate::config::OnReboot::Exit;
        let mut vm =
            Vm::create_restored(None, config, mem, pager, start, &snap).inspect_err(|_| {
                crate::snapshot::disks::remove_overlays(&overlays);
            })?;
        // Every restore is another generation of the VM (clones must not share random
        // state): a new ID in the (private) memory, announced when the VM starts. The guest's
        // entropy: with a virtio-rng device its driver reads the host's anyway.
        write_generation_id(&vm.machine.mem)?;
        vm.new_generation = true;
        // The snapshot restored from is the base of this VM's diff snapshots (a version 1
        // file has no id to refer to it by).
        if !lineage.id.is_empty() {
            let dir = dir
                .canonicalize()
                .map_err(io("cannot resolve the snapshot directory"))?;
            vm.machine
                .set_restored_base(crate::snapshot::SnapshotBase {
                    dir,
                    id: lineage.id,
                })?;
        }
        tracing::debug!(
            "restored {} vCPUs and {} MiB from {} ({} memory file{}) in {:?}",
            snap.vcpus.len(),
            snap.config.spec.memory >> 20,
            dir.display(),
            files.len(),
            if files.len() == 1 { "" } else { "s" },
            start.elapsed()
        );
        Ok(vm)
    }

    /// Builds the machine of `snap` with `config` on `mem` (which holds the saved memory) and
    /// loads the saved state; the devices start when it runs. `kvm` is the KVM half if it was
    /// built beforehand (used if it fits `config`).
    pub(crate) fn create_restored(
        kvm: Option<KvmMachine>,
        config: VmConfig,
        mem: GuestMem,
        pager: Option<crate::snapshot::pager::Pager>,
        start: Instant,
        snap: &crate::snapshot::VmSnapshot,
    ) -> Result<Vm, Error> {
        let kvm = match kvm {
            Some(k) if k.fits(&config) => {
                // Built (and validated) for another configuration of the same machine: this
                // one has its own console and sockets to check.
                config.validate_machine(k.max_vcpus, crate::config::host_memory())?;
                k
            }
            // Built for another machine: drop it (and its memory slots) first.
            other => {
                drop(other);
                KvmMachine::build(&config, &mem)?
            }
        };
        let mut vm = Vm::create_on(kvm, config, mem, pager, start)?;
        vm.machine.restore_state(snap)?;
        vm.restored = true;
        Ok(vm)
    }

    /// Builds the machine on `mem` (served by `pager`, if any): the VM, its irqchip, devices
    /// and vCPUs (CPUID, MSRs, LAPIC wiring and FPU as at power-on), with nothing loaded into
    /// memory yet.
    fn create(
        config: VmConfig,
        mem: GuestMem,
        pager: Option<crate::snapshot::pager::Pager>,
        start: Instant,
    ) -> Result<Vm, Error> {
        let kvm = KvmMachine::build(&config, &mem)?;
        Vm::create_on(kvm, config, mem, pager, start)
    }

    /// [`Vm::create`] on a KVM half built for `config` and `mem` (`config` validated).
    fn create_on(
        kvm: KvmMachine,
        config: VmConfig,
        mem: GuestMem,
        pager: Option<crate::snapshot::pager::Pager>,
        start: Instant,
    ) -> Result<Vm, Error> {
        // The machine was checked with the KVM half; now this host's side of it.
        config
            .bindings
            .check(&config.spec)
            .map_err(crate::config::ConfigError::from)?;
        let KvmMachine {
            vm,
            vcpus,
            msr_indices,
            ..
        } = kvm;

        let control = Arc::new(Control::new().map_err(io("cannot create the control channel"))?);
        let events = event_sink(control.clone());
        if let Some(p) = &pager {
            let c = control.clone();
            p.on_error(move |why| c.request_exit(ExitReason::Error(why)));
        }

        // Devices.
        let mut console = Console::open(
            config
                .bindings
                .console
                .as_ref()
                .unwrap_or(&crate::config::ConsoleConfig::Off),
        )?;
        let serial_irq: Arc<dyn Interrupt> = Arc::new(vm.irq_line(acpi::COM1_IRQ)?.event);
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, console.take_output())));
        let ged_irq: Arc<dyn Interrupt> = Arc::new(vm.irq_line(acpi::GED_IRQ)?.event);
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(
            events.clone(),
            ged_irq,
            acpi::S5_SLEEP_TYPE,
            acpi::RESET_VALUE,
        )));
        let boot_marker = Arc::new(Mutex::new(BootMarker::new(start)));
        let low = layout::low_ram_end(config.spec.memory);
        let cmos = shared(Cmos::new(low, config.spec.memory - low));

        let mut pio = Bus::new();
        pio.insert(serial.clone(), u64::from(acpi::COM1_PORT), 8)?;
        pio.insert(shared(I8042::new(events.clone())), 0x60, 5)?;
        pio.insert(cmos.clone(), u64::from(acpi::RTC_PORT), 2)?;
        pio.insert(shared(ExitDevice::new(events.clone())), 0xf4, 4)?;
        pio.insert(boot_marker.clone(), 0x3f0, 1)?;
        pio.insert(
            acpi_pm.clone(),
            u64::from(acpi::PM_BASE),
            u64::from(acpi::PM_PORTS),
        )?;
        let mut mmio = Bus::new();
        let virtio = crate::virtio::setup(&vm, &mem, &mut mmio, &config)?;

        if let Some(pci) = &virtio.pci {
            pio.insert(
                pci.config_io.clone(),
                devices::pci::PCI_CONFIG_IO_PORT,
                devices::pci::PCI_CONFIG_IO_SIZE,
            )?;
        }

        tracing::debug!(
            "VM built: {} vCPUs, {} MiB",
            config.spec.cpus,
            config.spec.memory >> 20
        );
        let power_on = if config.spec.on_reboot == OnReboot::Restart {
            Some(PowerOn {
                vm: vm.save_state()?,
                vcpus: vcpus
                    .iter()
                    .map(|v| devices::bus::lock(v).save_state(&msr_indices))
                    .collect::<Result<_, _>>()?,
            })
        } else {
            None
        };

        Ok(Vm {
            machine: Arc::new(Machine {
                disk_paths: Mutex::new(config.bindings.disks.clone()),
                config,
                vm_fd: vm,
                mem,
                vcpu_counters: vcpus.iter().map(|_| Arc::default()).collect(),
                vcpus,
                virtio,
                serial,
                cmos,
                acpi_pm,
                msr_indices,
                dirty: Default::default(),
                snapshot_base: Mutex::new(None),
                pager,
            }),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            control,
            console,
            boot_marker,
            started: start,
            boot: None,
            power_on,
            restored: false,
            new_generation: false,
            incoming: None,
        })
    }

    /// Writes the firmware tables and the kernel into memory and points the boot vCPU at the
    /// kernel's entry.
    fn load_boot(&mut self) -> Result<(), Error> {
        let config = &self.machine.config;
        let mem = &self.machine.mem;
        let virtio = &self.machine.virtio;
        // Firmware tables and the kernel.
        arch::mptable::setup_mptable(mem, config.spec.cpus)?;
        acpi::setup_reset_vector(mem)?;
        let pci_acpi = virtio.pci.as_ref().map(|p| p.acpi);
        let rsdp =
            acpi::setup_acpi_with_pci(mem, config.spec.cpus, &virtio.acpi, pci_acpi.as_ref())?;
        write_generation_id(mem)?;
        // Guests find virtio-mmio devices in the DSDT; a guest told not to use ACPI gets them
        // on its command line instead (announcing both would make Linux probe each twice).
        let mut cmdline = config.spec.boot.cmdline.clone();
        if config
            .spec
            .boot
            .cmdline
            .split_whitespace()
            .any(|w| w == "acpi=off")
        {
            for p in &virtio.cmdline {
                cmdline.push(' ');
                cmdline.push_str(p);
            }
        }
        let (kernel_path, _temp) = match config.kernel() {
            None => return Err(crate::config::ConfigError::NoKernel.into()),
            Some(KernelSource::Path(p)) => (p, None),
            Some(KernelSource::Bytes(name, bytes)) => {
                let t =
                    TempKernel::new(name, bytes).map_err(io("cannot stage the bundled guest"))?;
                (t.path.clone(), Some(t))
            }
        };
        let spec = KernelSpec {
            kernel: &kernel_path,
            initrd: config.spec.boot.initrd.as_deref(),
            cmdline: &cmdline,
            protocol: match config.spec.boot.protocol {
                crate::config::BootProtocol::Auto => None,
                crate::config::BootProtocol::Pvh => Some(regs::BootProtocol::Pvh),
                crate::config::BootProtocol::Linux64 => Some(regs::BootProtocol::Linux64),
            },
        };
        let boot = boot::load(mem, config.spec.memory, &spec, Some(rsdp))?;

        let vcpu = devices::bus::lock(&self.machine.vcpus[0]);
        let sregs = regs::setup_sregs(mem, boot.protocol, vcpu.sregs()?)?;
        vcpu.set_sregs(&sregs)?;
        vcpu.set_regs(&regs::boot_regs(boot.protocol, boot.entry.0))?;
        drop(vcpu);
        tracing::debug!("{:?} entry at {:#x}", boot.protocol, boot.entry.0);
        self.boot = Some(boot);
        Ok(())
    }

    /// Runs the vCPU threads until something stops the VM; returns why, with every vCPU
    /// thread joined.
    fn run_vcpus(
        &mut self,
        handle: &crate::api::VmHandle,
        signals: &[(i32, Arc<AtomicBool>)],
    ) -> ExitReason {
        let ctx = VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            control: self.control.clone(),
        };
        let mut handles: Vec<VcpuHandle> = Vec::with_capacity(self.machine.vcpus.len());
        for (v, counters) in self.machine.vcpus.iter().zip(&self.machine.vcpu_counters) {
            match vcpu::spawn(v.clone(), ctx.clone(), counters.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.control.request_exit(ExitReason::Error(format!(
                        "cannot start a vCPU thread: {e}"
                    )));
                    break;
                }
            }
        }
        *devices::bus::lock(&handle.kicks) = handles.iter().map(|h| h.kick).collect();

        // A signal may have come before its wake-up was registered: look before waiting.
        let reason = loop {
            if let Some(sig) = signals.iter().find(|(_, f)| f.load(Ordering::SeqCst)) {
                self.control.request_exit(ExitReason::Signal(sig.0));
            }
            if let Some(r) = self.control.exit_reason() {
                break r;
            }
            self.control.wait_wake();
        };

        self.control.set_state(RunState::Stopping);
        for h in &handles {
            h.kick.kick();
        }
        for h in handles {
            if h.thread.join().is_err() {
                tracing::error!("vCPU {} thread panicked", h.index);
            }
        }
        devices::bus::lock(&handle.kicks).clear();
        reason
    }

    /// A guest-initiated reset with `--on-reboot restart`: every device back to its power-on
    /// state, memory emptied and the kernel loaded again, the vCPUs and irqchip as before the
    /// first instruction. The vCPU threads are stopped.
    fn reboot(&mut self) -> Result<(), Error> {
        let Some(power_on) = &self.power_on else {
            return Ok(());
        };
        self.machine.virtio.reset_all();
        for r in arch::layout::ram_ranges(self.machine.config.spec.memory) {
            hypervisor::mem::discard(&self.machine.mem, r.0, r.1 as u64).map_err(|e| {
                Error::Io {
                    what: "cannot empty guest memory",
                    source: std::io::Error::other(e),
                }
            })?;
        }
        for (v, state) in self.machine.vcpus.iter().zip(&power_on.vcpus) {
            devices::bus::lock(v).restore_state(state)?;
        }
        self.machine
            .vm_fd
            .restore_state(&power_on.vm, hypervisor::ClockMode::Continue)?;
        self.load_boot()?;
        self.control.clear_exit();
        self.control.set_state(RunState::Running);
        Ok(())
    }

    /// Runs the VM until it stops, and returns why; serves the control API on the configured
    /// socket meanwhile.
    pub fn run(self) -> Result<ExitReason, Error> {
        // Nothing is served before the VM attaches (the socket appears then): the switch's
        // first controller is never asked.
        let switch = Arc::new(ApiSwitch::new(Arc::new(Ended {
            info: api::types::VmInfo {
                state: api::types::VmState::Running,
                vcpus: self.machine.config.spec.cpus,
                memory_bytes: self.machine.config.spec.memory,
                boot_time_ms: None,
                uptime_ms: 0,
                devices: Vec::new(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                exit_reason: None,
                pager: None,
            },
            counters: None,
        })));
        // The socket appears once the API talks to the running VM (a client that waits for
        // it may ask anything at once), and after the stop signals' handlers (it may signal).
        let mut server = None;
        let path = self.machine.config.bindings.api_socket.clone();
        let api = switch.clone();
        let result = self.run_attached_then(&switch, || {
            if let Some(path) = &path {
                server = Some(api::server::serve(path, api)?);
            }
            Ok(())
        });
        if let Some(server) = server {
            server.stop();
        }
        result
    }

    /// Runs the VM until it stops, with the API behind `switch` talking to it meanwhile (and
    /// reporting how it ended afterwards).
    pub fn run_attached(self, switch: &ApiSwitch) -> Result<ExitReason, Error> {
        self.run_attached_then(switch, || Ok(()))
    }

    /// [`Vm::run_attached`], calling `attached` once `switch` talks to the VM (and the stop
    /// signals have their handlers), before it runs.
    fn run_attached_then(
        mut self,
        switch: &ApiSwitch,
        attached: impl FnOnce() -> Result<(), Error>,
    ) -> Result<ExitReason, Error> {
        hypervisor::install_kick_handler()?;
        let signals = install_stop_signals(&self.control)?;
        self.console.start_input(
            SerialInput(self.machine.serial.clone()),
            self.control.clone(),
        )?;

        if self.restored {
            self.machine.resume_devices()?;
        }
        if std::mem::take(&mut self.new_generation) {
            if let Err(e) = devices::bus::lock(&self.machine.acpi_pm)
                .press_power_button(acpi::GED_EVENT_VMGENID)
            {
                tracing::warn!("cannot notify the guest of its new generation ID: {e}");
            }
        }
        let handle = Arc::new_cyclic(|me| {
            crate::api::VmHandle::new(
                me.clone(),
                self.machine.clone(),
                self.control.clone(),
                self.machine.config.spec.cpus,
                self.machine.config.spec.memory,
                self.started,
                self.boot_marker.clone(),
                self.machine.acpi_pm.clone(),
            )
        });
        if let Some(status) = self.incoming.take() {
            handle.set_incoming_migration(status);
        }
        switch.set(handle.clone());
        attached()?;
        // Built and started: from here the main thread only runs, restarts and ends the VM.
        jail::seccomp::enter(jail::seccomp::ThreadClass::Main)?;

        let reason = loop {
            let reason = self.run_vcpus(&handle, &signals);
            let restart = reason == ExitReason::Reset && self.power_on.is_some();
            if !restart {
                break reason;
            }
            match self.reboot() {
                Ok(()) => tracing::info!("the guest reset the VM: restarting it"),
                Err(e) => break ExitReason::Error(format!("cannot restart the VM: {e}")),
            }
        };
        if let Some(t) = devices::bus::lock(&self.boot_marker).boot_time() {
            tracing::debug!("boot time {:?}", t);
        }
        tracing::debug!(
            "VM with {} vCPUs ended: {reason}",
            self.machine.config.spec.cpus
        );
        if let Some(p) = &self.machine.pager {
            tracing::info!("userfaultfd pager: {}", p.stats());
        }
        if let Ok(mut info) = api::VmController::info(&*handle) {
            info.state = api::types::VmState::Stopped;
            info.exit_reason = Some(reason.to_string());
            switch.set(Arc::new(Ended {
                info,
                counters: Some(crate::api::counters(&self.machine)),
            }));
        }
        Ok(reason)
    }
}

fn shared<D: BusDevice + 'static>(d: D) -> Arc<Mutex<D>> {
    Arc::new(Mutex::new(d))
}

/// Maps device events to exit reasons.
fn event_sink(control: Arc<Control>) -> VmEventSink {
    // A fault-injection point for tests: `VESSEL_TEST_PANIC=guest-exit` makes the exit
    // device's port handler panic on the vCPU thread that wrote it, as a device bug would.
    let panic_on_exit = std::env::var("VESSEL_TEST_PANIC").is_ok_and(|v| v == "guest-exit");
    Arc::new(move |e| {
        if panic_on_exit && matches!(e, VmEvent::Exit(_)) {
            panic!("VESSEL_TEST_PANIC: the exit device's handler fails");
        }
        control.request_exit(match e {
            VmEvent::PowerOff => ExitReason::PowerOff,
            VmEvent::Reset => ExitReason::Reset,
            VmEvent::Exit(n) => ExitReason::GuestExit(n),
        })
    })
}

/// The signals that stop Vessel.
const STOP_SIGNALS: [i32; 2] = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];

/// The process's SIGINT and SIGTERM flags (for a main thread that polls), registered the
/// first time they are asked for, which must be before anything (an API socket) tells the
/// world the process is there: a signal sent from then on is never lost. Every VM of the
/// process shares them.
pub(crate) fn stop_flags() -> Result<Vec<(i32, Arc<AtomicBool>)>, Error> {
    static FLAGS: std::sync::OnceLock<Vec<(i32, Arc<AtomicBool>)>> = std::sync::OnceLock::new();
    if let Some(f) = FLAGS.get() {
        return Ok(f.clone());
    }
    let mut flags = Vec::new();
    for sig in STOP_SIGNALS {
        let flag = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(sig, flag.clone())
            .map_err(io("cannot install a signal handler"))?;
        flags.push((sig, flag));
    }
    // A jailed VMM starts with them blocked (see the jail): they may come in now.
    jail::sandbox::let_in(&STOP_SIGNALS);
    Ok(FLAGS.get_or_init(|| flags).clone())
}

/// SIGINT and SIGTERM set the process's flags ([`stop_flags`]) and wake the main thread.
fn install_stop_signals(control: &Control) -> Result<Vec<(i32, Arc<AtomicBool>)>, Error> {
    let flags = stop_flags()?;
    for sig in STOP_SIGNALS {
        let wake = control
            .wake_handle()
            .map_err(io("cannot install a signal handler"))?;
        signal_hook::low_level::pipe::register(sig, wake)
            .map_err(io("cannot install a signal handler"))?;
    }
    Ok(flags)
}
