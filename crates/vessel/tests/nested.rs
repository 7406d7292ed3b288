//! The nested test host: a real Debian kernel booted by Vessel inside a QEMU-emulated AMD-V
//! machine (see tests/nested/README.md). Slow (about 30 s a run) and needs the packages and
//! kernel that `scripts/setup --tests` installs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::nested::*;

/// The nested host's Debian kernel (a bzImage).
fn debian_bzimage() -> PathBuf {
    nested_env("NESTED_KERNEL")
}

/// Extracts the ELF vmlinux from a bzImage: the setup header locates the compressed payload,
/// whose magic says which decompressor to run.
fn extract_vmlinux(bzimage: &Path, out: &Path) {
    let d = std::fs::read(bzimage).unwrap();
    let setup_sects = if d[0x1f1] == 0 { 4 } else { d[0x1f1] as usize };
    let pm = (setup_sects + 1) * 512;
    let word = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) as usize;
    let (off, len) = (word(0x248), word(0x24c));
    let payload = &d[pm + off..pm + off + len];
    let tool: &[&str] = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', ..] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => panic!("unknown kernel payload compression {:02x?}", &payload[..4]),
    };
    let compressed = out.with_extension("payload");
    std::fs::write(&compressed, payload).unwrap();
    let f = std::fs::File::create(out).unwrap();
    let status = Command::new(tool[0])
        .args(&tool[1..])
        .arg(&compressed)
        .stdout(f)
        .status()
        .expect("run the kernel decompressor");
    std::fs::remove_file(&compressed).unwrap();
    // The payload may carry trailing padding some decompressors complain about; the ELF
    // header check below is what matters.
    if !status.success() {
        eprintln!("{} exited with {status}", tool[0]);
    }
    assert_eq!(&std::fs::read(out).unwrap()[..4], b"\x7fELF");
}

#[test]
fn debian_kernel_boots_on_2_vcpus_and_powers_off() {
    let log = nested_run(&[
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--l2-cmd",
        "echo RTC=$(cat /sys/class/rtc/rtc0/since_epoch) NOW=$(date +%s)",
    ]);
    // Both vCPUs came up, through the MADT Vessel wrote.
    assert!(log.contains("smp: Brought up 1 node, 2 CPUs"), "{log}");
    assert!(log.contains("L2: cpus=2"), "{log}");
    // The e820 map is the one Vessel gave a 512 MiB guest.
    for line in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved",
        "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
    ] {
        assert!(log.contains(line), "missing '{line}' in:\n{log}");
    }
    // The CMOS RTC tells the real time.
    let rtc_line = log
        .lines()
        .find(|l| l.starts_with("RTC="))
        .unwrap_or_else(|| panic!("no RTC line in:\n{log}"));
    let nums: Vec<i64> = rtc_line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse().ok()))
        .collect();
    assert_eq!(nums.len(), 2, "{rtc_line}");
    assert!(
        (nums[0] - nums[1]).abs() <= 5,
        "RTC far from the clock: {rtc_line}"
    );
    // poweroff -f in the guest reached Vessel through ACPI S5 and ended it with 0.
    assert!(log.contains("reboot: Power down"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}

#[test]
fn vmlinux_boots_through_its_pvh_entry() {
    let vmlinux = repo_root().join("target/nested-vmlinux");
    extract_vmlinux(&debian_bzimage(), &vmlinux);
    let l1_file = format!("{}:/l2/vmlinux", vmlinux.display());
    let log = nested_run(&[
        "--l1-file",
        &l1_file,
        "--vessel-args",
        "run --log-level debug --kernel /l2/vmlinux --initrd /l2/initrd.cpio.gz --cpus 2 \
         --memory 256M --cmdline 'console=ttyS0 panic=1'",
    ]);
    assert!(
        log.contains("Pvh entry at"),
        "vessel used the PVH entry: {log}"
    );
    assert!(log.contains("smp: Brought up 1 node, 2 CPUs"), "{log}");
    assert!(log.contains("L2: cpus=2"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
    let _ = std::fs::remove_file(vmlinux);
}

/// A 16 MiB disk whose first sector starts with `pattern` (23 bytes: what [`L2_PROBE`] reads
/// back), and the `--l1-file` argument that carries it into L1 as /disk.raw.
fn patterned_disk(name: &str, pattern: &[u8; 23]) -> (PathBuf, String) {
    let disk = repo_root().join(format!("target/{name}.raw"));
    let mut data = pattern.to_vec();
    data.resize(16 << 20, 0);
    std::fs::write(&disk, &data).unwrap();
    let l1_file = format!("{}:/disk.raw", disk.display());
    (disk, l1_file)
}

/// L2 commands that print the first sector of /dev/vda, its serial, the hwrng in use and
/// 16 bytes read from it.
const L2_PROBE: &str = "echo SECTOR0=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 23); \
     echo SERIAL=$(cat /sys/block/vda/serial); \
     echo RNG=$(cat /sys/devices/virtual/misc/hw_random/rng_current); \
     echo RANDOM=$(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); ";

/// Checks that the probe read 16 random bytes from the hwrng.
fn assert_random(log: &str) {
    let random = log
        .lines()
        .find_map(|l| l.strip_prefix("RANDOM="))
        .unwrap_or_else(|| panic!("no RANDOM line in:\n{log}"));
    assert_eq!(random.trim().len(), 32, "16 random bytes: {random}");
}

#[test]
fn debian_kernel_finds_virtio_mmio_devices_through_acpi() {
    let (disk, l1_file) = patterned_disk("nested-disk", b"HOST-PATTERN-0123456789");
    let probe = format!("{L2_PROBE} grep virtio /proc/interrupts");
    let log = nested_run(&[
        "--l1-file",
        &l1_file,
        "--vessel-args",
        "run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 2 --memory 512M \
         --disk path=/disk.raw,serial=nested-disk --rng \
         --cmdline 'console=ttyS0 panic=1 l2mods=virtio_mmio,virtio_blk,virtio_rng'",
        "--l2-cmd",
        &probe,
    ]);
    let _ = std::fs::remove_file(&disk);
    // Debian's kernel has no virtio_mmio.device= support: it found both devices in the DSDT.
    assert!(log.contains("[vda] 32768 512-byte logical blocks"), "{log}");
    assert!(log.contains("SECTOR0=HOST-PATTERN-0123456789"), "{log}");
    assert!(log.contains("SERIAL=nested-disk"), "{log}");
    assert!(log.contains("RNG=virtio_rng.0"), "{log}");
    assert_random(&log);
    // Interrupts reach the guest through the IOAPIC.
    assert!(log.contains("IO-APIC   5-edge      virtio0"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}

#[test]
fn debian_kernel_drives_virtio_pci_devices_with_msix() {
    let (disk, l1_file) = patterned_disk("nested-disk-pci", b"HOST-PATTERN-PCI-012345");
    let probe = format!(
        "{L2_PROBE} grep -i pci /proc/interrupts; echo LSPCI; \
         for d in /sys/bus/pci/devices/*; do echo $d $(cat $d/vendor $d/device); done"
    );
    let log = nested_run(&[
        "--l1-file",
        &l1_file,
        "--vessel-args",
        "run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 2 --memory 512M \
         --transport pci --disk path=/disk.raw,serial=nested-pci-disk --rng \
         --cmdline 'console=ttyS0 panic=1 l2mods=virtio_pci,virtio_blk,virtio_rng'",
        "--l2-cmd",
        &probe,
    ]);
    let _ = std::fs::remove_file(&disk);
    // Linux found the host bridge and ECAM through ACPI, and both functions on bus 0.
    assert!(log.contains("PNP0A08"), "{log}");
    assert!(log.contains("0000:00:01.0 0x1af4 0x1042"), "{log}");
    assert!(log.contains("0000:00:02.0 0x1af4 0x1044"), "{log}");
    assert!(log.contains("[vda] 32768 512-byte logical blocks"), "{log}");
    assert!(log.contains("SECTOR0=HOST-PATTERN-PCI-012345"), "{log}");
    assert!(log.contains("SERIAL=nested-pci-disk"), "{log}");
    assert!(log.contains("RNG=virtio_rng.0"), "{log}");
    assert_random(&log);
    // Interrupts arrive as MSI-X messages (older kernels say PCI-MSI for MSI-X too): a config
    // vector and a queue vector per device.
    let msix: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PCI-MSI") && l.contains("virtio"))
        .collect();
    assert!(msix.iter().any(|l| l.contains("virtio0-req.0")), "{log}");
    assert!(msix.iter().any(|l| l.contains("virtio1-")), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}

#[test]
fn debian_kernel_falls_back_to_pci_intx_without_msi() {
    let (disk, l1_file) = patterned_disk("nested-disk-intx", b"HOST-PATTERN-INTX-01234");
    let probe = format!("{L2_PROBE} grep virtio /proc/interrupts");
    let log = nested_run(&[
        "--l1-file",
        &l1_file,
        "--vessel-args",
        "run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 2 --memory 512M \
         --transport pci --disk path=/disk.raw --rng \
         --cmdline 'console=ttyS0 panic=1 pci=nomsi l2mods=virtio_pci,virtio_blk,virtio_rng'",
        "--l2-cmd",
        &probe,
    ]);
    let _ = std::fs::remove_file(&disk);
    assert!(log.contains("SECTOR0=HOST-PATTERN-INTX-01234"), "{log}");
    assert_random(&log);
    // The _PRT routes slot 1 to GSI 16 and slot 2 to GSI 17, level-triggered.
    assert!(log.contains("IO-APIC  16-fasteoi   virtio0"), "{log}");
    assert!(log.contains("IO-APIC  17-fasteoi   virtio1"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}

/// L2 commands that write 8 MiB of random data to `dev`, drop the page cache and compare what
/// reads back (Linux has many requests in flight both ways: writeback and readahead).
fn l2_roundtrip(dev: &str, tag: &str) -> String {
    format!(
        "head -c 8388608 /dev/urandom > /tmp/{tag}; \
         dd if=/tmp/{tag} of=/dev/{dev} bs=1M 2>/dev/null; sync; \
         echo 3 > /proc/sys/vm/drop_caches; \
         a=$(md5sum < /tmp/{tag} | cut -c1-32); \
         b=$(dd if=/dev/{dev} bs=1M count=8 2>/dev/null | md5sum | cut -c1-32); \
         [ \"$a\" = \"$b\" ] && echo {tag}=same || echo {tag}=DIFFERENT $a $b; "
    )
}

#[test]
fn debian_kernel_io_through_io_uring_and_threads_engines() {
    let (uring, uring_file) = patterned_disk("nested-uring", b"HOST-PATTERN-URING-0123");
    let (threads, threads_file) = patterned_disk("nested-threads", b"HOST-PATTERN-THREADS-01");
    let threads_file = threads_file.replace(":/disk.raw", ":/disk2.raw");
    let probe = format!(
        "{}{}",
        l2_roundtrip("vda", "URING"),
        l2_roundtrip("vdb", "THREADS")
    );
    let log = nested_run(&[
        "--l1-file",
        &uring_file,
        "--l1-file",
        &threads_file,
        "--vessel-args",
        "run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 2 --memory 512M \
         --disk path=/disk.raw,engine=io_uring,queues=2 \
         --disk path=/disk2.raw,engine=threads,iops=2000 \
         --cmdline 'console=ttyS0 panic=1 l2mods=virtio_mmio,virtio_blk'",
        "--l2-cmd",
        &probe,
    ]);
    let _ = std::fs::remove_file(&uring);
    let _ = std::fs::remove_file(&threads);
    assert!(log.contains("URING=same"), "{log}");
    assert!(log.contains("THREADS=same"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}

/// L1's set-up for the jail test: a cgroup v2 hierarchy with every controller (L1 boots no
/// init system, so nothing binds them to cgroup v1), and a watcher that records the jailed
/// VMM's credentials and its cgroup's limits once it is in it.
const JAIL_L1: &str = r#"mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
(
    cg=/sys/fs/cgroup/vessel/l2
    i=0
    while [ $i -lt 600 ]; do
        pid=$(head -n1 $cg/cgroup.procs 2>/dev/null)
        if [ -n "$pid" ]; then
            sleep 1
            {
                echo "JAIL: $(grep ^Uid: /proc/$pid/status | tr -s '\t ' ' ')"
                echo "JAIL: $(grep ^CapEff: /proc/$pid/status | tr -s '\t ' ' ')"
                echo "JAIL: $(grep ^NSpid: /proc/$pid/status | tr -s '\t ' ' ')"
                echo "JAIL: memory.max=$(cat $cg/memory.max) cpu.max=$(cat $cg/cpu.max) pids.max=$(cat $cg/pids.max)"
            } > /tmp/jail.log
            exit 0
        fi
        i=$((i + 1))
        sleep 0.2
    done
    echo "JAIL: the VMM never joined its cgroup" > /tmp/jail.log
) >/dev/null 2>&1 &
"#;

/// L1's `/l1-after`: what the watcher saw, and whether the keeper removed the cgroup.
const JAIL_AFTER: &str = r#"cat /tmp/jail.log
if [ -d /sys/fs/cgroup/vessel/l2 ]; then echo "JAIL: cgroup left behind"; else echo "JAIL: cgroup removed"; fi
"#;

#[test]
fn debian_kernel_boots_in_a_jail_with_cgroup_limits() {
    let dir = repo_root().join(format!("target/nested-jail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let setup = dir.join("jail-setup.sh");
    let after = dir.join("l1-after");
    std::fs::write(&setup, JAIL_L1).unwrap();
    std::fs::write(&after, JAIL_AFTER).unwrap();
    let setup_file = format!("{}:/jail-setup.sh", setup.display());
    let after_file = format!("{}:/l1-after", after.display());
    let log = nested_run(&[
        "--l1-file",
        &setup_file,
        "--l1-file",
        &after_file,
        "--vessel-args",
        "run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 1 --memory 256M \
         --jail uid=1000,gid=1000,cgroup=vessel/l2,memory-max=1G,cpu-max=90%,pids-max=64 \
         --cmdline 'console=ttyS0 panic=1' $(sh /jail-setup.sh)",
        "--l2-cmd",
        "echo L2: jailed guest up",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    // A real Linux guest booted and powered off under the jailed VMM.
    assert!(log.contains("L2: jailed guest up"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
    for line in [
        "JAIL: Uid: 1000 1000 1000 1000",
        "JAIL: CapEff: 0000000000000000",
        "JAIL: memory.max=1073741824 cpu.max=90000 100000 pids.max=64",
        "JAIL: cgroup removed",
    ] {
        assert!(log.contains(line), "missing '{line}' in:\n{log}");
    }
    // PID 1 of its own PID namespace.
    assert!(
        log.lines()
            .any(|l| l.starts_with("JAIL: NSpid:") && l.trim_end().ends_with(" 1")),
        "{log}"
    );
}
