//! Loading a kernel, its initrd and command line, and the boot-protocol structures that tell it
//! about the machine: the Linux zero page or the PVH start_info.
//!
//! Formats: Linux bzImage (64-bit boot protocol), ELF vmlinux with a PVH note (PVH entry), and
//! ELF without one (64-bit entry at `e_entry`, zero page in %rsi). `linux-loader` parses them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use guestmem::GuestMem;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::regs::BootProtocol;

/// Errors loading a kernel and preparing its boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a kernel Vessel can boot: neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(PathBuf),
    #[error("cannot load kernel {path}: {reason} (a corrupt or truncated image, or too little guest memory)")]
    Load { path: PathBuf, reason: String },
    #[error(
        "kernel {0} has no 64-bit entry point (XLF_KERNEL_64): Vessel boots x86_64 kernels only"
    )]
    Not64Bit(PathBuf),
    #[error("kernel {0} has no PVH entry note, but the PVH boot protocol was requested")]
    NoPvhEntry(PathBuf),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel; give the VM more memory")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write the {0} into guest memory")]
    Configure(&'static str),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    /// Force a boot protocol; `None` picks PVH for ELF kernels that have the note.
    pub protocol: Option<BootProtocol>,
}

/// Where and how to enter the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub protocol: BootProtocol,
    pub entry: GuestAddress,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const XLF_KERNEL_64: u16 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn probe(file: &mut File) -> std::io::Result<Option<Format>> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(Some(Format::Elf));
    }
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    if file.read_exact(&mut magic).is_ok() && &magic == BZIMAGE_MAGIC {
        return Ok(Some(Format::BzImage));
    }
    Ok(None)
}

/// Loads the kernel, initrd and command line into `mem` and writes the boot-protocol structures.
/// `rsdp` is where the ACPI tables start, if the VM has them.
pub fn load(
    mem: &GuestMem,
    mem_size: u64,
    spec: &KernelSpec,
    rsdp: Option<GuestAddress>,
) -> Result<BootEntry, Error> {
    let path = spec.kernel.to_path_buf();
    let open_err = |source| Error::Open {
        what: "kernel",
        path: path.clone(),
        source,
    };
    let mut file = File::open(spec.kernel).map_err(open_err)?;
    let format = probe(&mut file)
        .map_err(open_err)?
        .ok_or_else(|| Error::UnknownFormat(path.clone()))?;
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    let load_err = |e: linux_loader::loader::Error| Error::Load {
        path: path.clone(),
        reason: e.to_string(),
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = match format {
        Format::Elf => Elf::load(mem, None, &mut file, himem).map_err(load_err)?,
        Format::BzImage => BzImage::load(mem, None, &mut file, himem).map_err(load_err)?,
    };

    let (protocol, entry) = match (format, loaded.pvh_boot_cap, spec.protocol) {
        (Format::Elf, PvhBootCapability::PvhEntryPresent(e), None | Some(BootProtocol::Pvh)) => {
            (BootProtocol::Pvh, e)
        }
        (_, _, Some(BootProtocol::Pvh)) => return Err(Error::NoPvhEntry(path)),
        (Format::Elf, _, _) => (BootProtocol::Linux64, loaded.kernel_load),
        (Format::BzImage, _, _) => {
            let hdr = loaded.setup_header.unwrap_or_default();
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::Not64Bit(path));
            }
            // The 64-bit entry is 0x200 past the protected-mode code's start.
            (
                BootProtocol::Linux64,
                GuestAddress(loaded.kernel_load.0 + 0x200),
            )
        }
    };

    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(
            mem,
            mem_size,
            p,
            loaded.kernel_end,
            &loaded.setup_header,
        )?),
        None => None,
    };

    let capacity = match loaded.setup_header {
        Some(h) if h.cmdline_size > 0 => (h.cmdline_size as usize + 1).min(CMDLINE_MAX_SIZE),
        _ => CMDLINE_MAX_SIZE,
    };
    let cmdline = Cmdline::try_from(spec.cmdline, capacity).map_err(|e| {
        Error::Cmdline(format!(
            "{e} ({} bytes; this kernel accepts {})",
            spec.cmdline.len(),
            capacity - 1
        ))
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    let cmdline_len = spec.cmdline.len() as u32 + 1;

    let e820 = e820_map(mem_size);
    match protocol {
        BootProtocol::Linux64 => {
            write_zero_page(mem, loaded.setup_header, cmdline_len, initrd, &e820, rsdp)?
        }
        BootProtocol::Pvh => write_start_info(mem, initrd, &e820, rsdp)?,
    }
    Ok(BootEntry { protocol, entry })
}

/// Loads the initrd at the top of low RAM, page-aligned, and returns (address, size).
fn load_initrd(
    mem: &GuestMem,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
    hdr: &Option<setup_header>,
) -> Result<(u64, u64), Error> {
    let open_err = |source| Error::Open {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let addr_max = match hdr {
        Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => h.initrd_addr_max as u64,
        Some(_) => DEFAULT_INITRD_ADDR_MAX,
        None => u64::MAX,
    };
    let top = low_ram_end(mem_size).min(addr_max.saturating_add(1));
    let too_large = || Error::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| Error::ReadInitrd {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMem,
    hdr: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: Option<GuestAddress>,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(h) = hdr {
        params.hdr = h;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp.map_or(0, |a| a.0);
    for (i, e) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|_| Error::Configure("zero page"))
}

fn write_start_info(
    mem: &GuestMem,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: Option<GuestAddress>,
) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp.map_or(0, |a| a.0),
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|_| Error::Configure("PVH start_info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> GuestMem {
        GuestMem::from_ranges(&ram_ranges(size)).unwrap()
    }

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vessel-arch-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn spec<'a>(kernel: &'a Path, cmdline: &'a str) -> KernelSpec<'a> {
        KernelSpec {
            kernel,
            initrd: None,
            cmdline,
            protocol: None,
        }
    }

    #[test]
    fn garbage_and_missing_kernels_are_clear_errors() {
        let m = mem(64 << 20);
        let p = temp("garbage", &[0x55; 4096]);
        let e = load(&m, 64 << 20, &spec(&p, ""), None).unwrap_err();
        assert!(matches!(e, Error::UnknownFormat(_)), "{e}");
        let e = load(
            &m,
            64 << 20,
            &spec(Path::new("/nonexistent/vmlinux"), ""),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
        let mut truncated_elf = ELF_MAGIC.to_vec();
        truncated_elf.extend_from_slice(&[2, 1, 1]);
        let p2 = temp("truncated", &truncated_elf);
        let e = load(&m, 64 << 20, &spec(&p2, ""), None).unwrap_err();
        assert!(matches!(e, Error::Load { .. }), "{e}");
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(p2).unwrap();
    }

    #[test]
    fn zero_page_describes_memory_cmdline_and_initrd() {
        let size = 128 << 20;
        let m = mem(size);
        let initrd = temp("initrd", &[7u8; 10_000]);
        let (addr, len) = load_initrd(&m, size, &initrd, 0x20_0000, &None).unwrap();
        assert_eq!(len, 10_000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + len <= size);
        let e820 = e820_map(size);
        write_zero_page(
            &m,
            None,
            5,
            Some((addr, len)),
            &e820,
            Some(GuestAddress(ACPI_START)),
        )
        .unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries as usize, e820.len());
        assert_eq!({ p.hdr.ramdisk_image } as u64, addr);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        std::fs::remove_file(initrd).unwrap();
    }

    #[test]
    fn an_initrd_larger_than_memory_is_refused() {
        let m = mem(16 << 20);
        let initrd = temp("big-initrd", &vec![0u8; 17 << 20]);
        let e = load_initrd(&m, 16 << 20, &initrd, 0x20_0000, &None).unwrap_err();
        assert!(matches!(e, Error::InitrdTooLarge { .. }));
        std::fs::remove_file(initrd).unwrap();
    }

    #[test]
    fn pvh_start_info_lists_memory() {
        let m = mem(64 << 20);
        let e820 = e820_map(64 << 20);
        write_start_info(&m, Some((0x30_0000, 42)), &e820, None).unwrap();
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!(si.memmap_entries as usize, e820.len());
        assert_eq!(si.nr_modules, 1);
        let first: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_START)).unwrap();
        assert_eq!((first.addr, first.size), (0, EBDA_START));
    }
}
