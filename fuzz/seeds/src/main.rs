//! Writes well-formed seeds, made with the real types, for the fuzz targets whose inputs are
//! structured files or streams: `snapshot_state` (a state file, and a body for the target to
//! wrap), `migration_frames` (a whole incoming stream, pre-copy and post-copy) and `qcow2`
//! (small images from `vessel image create`, with data written). Run from the repository's
//! top directory: `scripts/fuzz seeds`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiPmState, Cmos, LegacyState, Serial};
use devices::pci::msix::{MsiMessage, MsiVectors};
use devices::pci::{PciConfigIo, PciRoot, PciWindow};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::rng::Rng;
use guestmem::GuestMem;
use hypervisor::kvm::kvm_cpuid_entry2;
use hypervisor::{FpuState, MsrEntry, VcpuState, VmState};
use vm_memory::GuestAddress;
use vmm::config::Transport;
use vmm::migration::postcopy::DirtySet;
use vmm::migration::protocol::{self, Hello, Round, Tag};
use vmm::snapshot::format::{write_state, Lineage, SnapshotRef};
use vmm::snapshot::memory::MemoryRegionInfo;
use vmm::snapshot::{VirtioState, VmSnapshot};
use vmm::VmConfig;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct NoVectors;
impl MsiVectors for NoVectors {
    fn trigger(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn program(&self, _: u16, _: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

const MEMORY: u64 = 256 << 20;

/// Unsealed frames (tag, length, body): what the `migration_frames` target reads.
struct Plain(Vec<u8>);

impl protocol::FrameWrite for Plain {
    fn write_frame(&mut self, tag: Tag, parts: &[&[u8]]) -> Result<(), protocol::ProtocolError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.0.push(tag as u8);
        self.0.extend_from_slice(&(len as u64).to_le_bytes());
        for p in parts {
            self.0.extend_from_slice(p);
        }
        Ok(())
    }
}

fn config(transport: Transport) -> VmConfig {
    let spec = vmm::config::VmSpec {
        memory: MEMORY,
        rng: true,
        transport,
        ..Default::default()
    };
    VmConfig::new(spec, Default::default())
}

fn snapshot(transport: Transport) -> VmSnapshot {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let virtio = match transport {
        Transport::Mmio => VirtioState::Mmio(vec![MmioTransport::new(
            mem.clone(),
            irq.clone(),
            Box::new(Rng::new()),
        )
        .unwrap()
        .state()]),
        Transport::Pci => {
            let root = Arc::new(Mutex::new(PciRoot::new(PciWindow::new(
                0xe000_0000,
                1 << 24,
            ))));
            let f =
                VirtioPciDevice::new(mem, Box::new(Rng::new()), Arc::new(NoVectors), None).unwrap();
            VirtioState::Pci {
                root: PciConfigIo::new(root).state(),
                functions: vec![f.state()],
            }
        }
    };
    let leaf = |function, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    };
    VmSnapshot {
        config: config(transport),
        memory: vec![MemoryRegionInfo {
            guest_addr: 0,
            size: MEMORY,
            file_offset: 0,
        }],
        vcpus: vec![VcpuState {
            id: 0,
            cpuid: vec![
                leaf(0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
                leaf(1, 0x806f8, 0, 0x7ffa_3203, 0x178b_fbff),
            ],
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            fpu: FpuState::Xsave(vec![0; 1024]),
            xcrs: None,
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![MsrEntry {
                index: 0x10,
                data: 12345,
            }],
            events: Default::default(),
            tsc_khz: Some(2_000_000),
        }],
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
            saved_at_ns: 1,
        },
        legacy: LegacyState {
            serial: Serial::new(irq, Box::new(std::io::sink())).state(),
            cmos: Cmos::new(MEMORY, 0).state(),
            acpi_pm: AcpiPmState::default(),
        },
        virtio,
        frozen_disks: Vec::new(),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
    println!("{} ({} bytes)", dir.join(name).display(), bytes.len());
}

fn main() {
    let corpus = Path::new("fuzz/corpus");
    let tmp = std::env::temp_dir().join(format!("vessel-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    // snapshot_state: whole files (mode 0), and bodies for the target to wrap (mode 1 | ...).
    let dir = corpus.join("snapshot_state");
    for (i, t) in [Transport::Mmio, Transport::Pci].into_iter().enumerate() {
        let snap = snapshot(t);
        let lineage = Lineage {
            id: "0123456789abcdef".into(),
            parent: (i == 1).then(|| SnapshotRef {
                dir: "/snaps/base".into(),
                id: "fedcba9876543210".into(),
            }),
        };
        let p = tmp.join("state");
        write_state(&p, &snap, &lineage).unwrap();
        let mut file = vec![0u8];
        file.extend(std::fs::read(&p).unwrap());
        write(&dir, &format!("file-{i}"), &file);
        let mut body = vec![1u8 | 2 | (i as u8) << 2];
        body.extend(serde_json::to_vec(&snap).unwrap());
        write(&dir, &format!("body-{i}"), &body);
    }

    // migration_frames: a pre-copy stream, and one that switches to post-copy.
    let dir = corpus.join("migration_frames");
    for (i, post) in [false, true].into_iter().enumerate() {
        let mut w = Plain(Vec::new());
        let hello = Hello {
            magic: protocol::MAGIC.into(),
            version: protocol::VERSION,
            vessel_version: "0.1.0".into(),
            machine: config(Transport::Mmio).spec,
            source_paths: Default::default(),
            full_digest: post,
        };
        protocol::write_json(&mut w, Tag::Hello, &hello).unwrap();
        let page = [0x5au8; 4096];
        for addr in [0u64, 0x3000] {
            let n = 1u32.to_le_bytes();
            protocol::write_frame(&mut w, Tag::Pages, &[&addr.to_le_bytes(), &n, &page]).unwrap();
        }
        let round = Round {
            round: 2,
            remaining_bytes: 8192,
        };
        protocol::write_json(&mut w, Tag::Round, &round).unwrap();
        if post {
            let set = DirtySet {
                regions: vec![(0, 1 << 20, vec![0b1011_0110, 0, 1 << 63, 0])],
            };
            protocol::write_json(&mut w, Tag::Postcopy, &set).unwrap();
        }
        protocol::write_json(&mut w, Tag::State, &snapshot(Transport::Mmio)).unwrap();
        if post {
            let addr = 0x1000u64;
            let n = 2u32.to_le_bytes();
            let pages = [0xa5u8; 8192];
            protocol::write_frame(&mut w, Tag::Pages, &[&addr.to_le_bytes(), &n, &pages]).unwrap();
            protocol::write_frame(&mut w, Tag::PostcopyEnd, &[]).unwrap();
        }
        write(&dir, &format!("stream-{i}"), &w.0);
    }

    // qcow2: small images (512-byte clusters), one with data in a few clusters.
    let dir = corpus.join("qcow2");
    for (i, (size, cluster)) in [(64u64 << 10, 512u64), (1 << 20, 4096)]
        .into_iter()
        .enumerate()
    {
        let p = tmp.join(format!("image-{i}.qcow2"));
        let _ = std::fs::remove_file(&p);
        let opts = block::ops::CreateOptions {
            format: Some(block::Format::Qcow2),
            size: Some(size),
            backing: None,
            backing_format: None,
            prealloc: Default::default(),
            cluster_size: Some(cluster),
            force: true,
        };
        block::ops::create(&p, &opts).unwrap();
        if i == 0 {
            let disk = block::open(&p, block::OpenOptions::default()).unwrap();
            disk.write_at(&[0xaa; 1024], 0).unwrap();
            disk.write_at(&[0xbb; 512], size / 2).unwrap();
            disk.flush().unwrap();
        }
        write(&dir, &format!("image-{i}"), &std::fs::read(&p).unwrap());
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
