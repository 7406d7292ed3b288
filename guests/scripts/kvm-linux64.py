#!/usr/bin/env python3
"""Boot the guest ELF on /dev/kvm through the Linux 64-bit boot protocol.

A deliberately tiny stand-in VMM (no dependencies beyond Python 3) used to
check the guest's `linux64` entry independently of Vessel and QEMU (QEMU only
boots the guest through PVH). It lays memory out the way Vessel does:

  0x500   GDT (0x10 = 64-bit code, 0x18 = data), IDT at 0x520
  0x7000  boot_params (e820 table, cmd_line_ptr, acpi_rsdp_addr = 0)
  0x8ff0  initial stack
  0x9000  page tables: PML4, PDPT at 0xa000, 4 PDs at 0xb000 (2 MiB pages, 0..4 GiB)
  0x20000 command line
  0x9fc00 MP table (one processor entry per vCPU; there are no ACPI tables)

and enters the ELF's e_entry in long mode with %rsi = 0x7000. It emulates
COM1 output (0x3f8/0x3fd), the exit device (0xf4), the boot marker (0x3f0)
and the i8042 reset (0x64). The in-kernel irqchip provides the local APICs,
so INIT/SIPI start the APs.

With --firmware FILE --rsdp ADDR, the bytes 0x9fc00..0x100000 of FILE (a dump
of low guest memory holding MP/ACPI tables, e.g. from Vessel's arch crate)
replace the generated MP table, and boot_params.acpi_rsdp_addr is set. Writes
to the ACPI ports Vessel uses (sleep control 0x600, reset 0x602) are handled.

usage: kvm-linux64.py ELF [-s CPUS] [-m MIB] [-a CMDLINE] [--firmware F --rsdp A]
Exit status: the guest's exit-device value; 100 on a triple fault (shutdown),
101 on a reset (i8042 or ACPI), 102 on a timeout, 103 on an unexpected exit,
104 on an ACPI sleep request (SLP_EN).
"""

import argparse
import ctypes
import mmap
import os
import struct
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.ioctl.restype = ctypes.c_int


def _ioc(d, nr, size):
    return (d << 30) | (size << 16) | (0xAE << 8) | nr


KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_GET_SUPPORTED_CPUID = _ioc(3, 0x05, 8)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(1, 0x46, 32)
KVM_SET_TSS_ADDR = _ioc(0, 0x47, 0)
KVM_CREATE_IRQCHIP = _ioc(0, 0x60, 0)
KVM_RUN = _ioc(0, 0x80, 0)
KVM_SET_REGS = _ioc(1, 0x82, 144)
KVM_GET_SREGS = _ioc(2, 0x83, 312)
KVM_SET_SREGS = _ioc(1, 0x84, 312)
KVM_SET_CPUID2 = _ioc(1, 0x90, 8)

EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_SHUTDOWN, EXIT_INTR = 2, 5, 6, 8, 10


def ioctl(fd, req, arg=0):
    ret = libc.ioctl(fd, req, arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {req:#x}: {os.strerror(err)}")
    return ret


class Segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
                ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8),
                ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8),
                ("unusable", ctypes.c_uint8), ("padding", ctypes.c_uint8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
                ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
                ("gdt", DTable), ("idt", DTable), ("cr0", ctypes.c_uint64),
                ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
                ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64),
                ("efer", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
        "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class MemRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


def cpuid_buffer(nent):
    class Cpuid2(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", ctypes.c_uint32 * (10 * nent))]
    buf = Cpuid2()
    buf.nent = nent
    return buf


def checksum_fix(table, at):
    table[at] = (-sum(table)) & 0xff


def mp_table(cpus, base):
    """MP floating pointer at `base`, configuration table right after it."""
    entries = b""
    for i in range(cpus):
        flags = 1 | (2 if i == 0 else 0)  # enabled, bootstrap processor
        entries += struct.pack("<BBBBII8x", 0, i, 0x14, flags, 0x600, 0x201)
    header_len = 44
    table = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", header_len + len(entries), 4, 0,
                                  b"VESSEL  ", b"HARNESS     ", 0, 0, cpus, 0xFEE00000, 0, 0, 0))
    table += entries
    checksum_fix(table, 7)
    fp = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", base + 16, 1, 4, 0, 0))
    checksum_fix(fp, 10)
    return bytes(fp) + bytes(table)


def load_elf(mem, path):
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _, off, _, paddr, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            mem[paddr:paddr + filesz] = data[off:off + filesz]
            mem[paddr + filesz:paddr + memsz] = bytes(memsz - filesz)
    return entry


def setup_memory(mem, size, cpus, cmdline, firmware, rsdp):
    # GDT: null, null, 0x10 code64, 0x18 data
    mem[0x500:0x520] = struct.pack("<4Q", 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
    # Page tables: identity map 0..4 GiB with 2 MiB pages.
    mem[0x9000:0x9008] = struct.pack("<Q", 0xA000 | 3)
    for i in range(4):
        mem[0xA000 + 8 * i:0xA008 + 8 * i] = struct.pack("<Q", (0xB000 + 0x1000 * i) | 3)
    mem[0xB000:0xF000] = b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(2048))
    # Command line.
    raw = cmdline.encode() + b"\0"
    mem[0x20000:0x20000 + len(raw)] = raw
    # boot_params
    bp = bytearray(4096)
    e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xE0000, 0x20000, 2), (0x100000, size - 0x100000, 1)]
    for i, (addr, length, kind) in enumerate(e820):
        struct.pack_into("<QQI", bp, 0x2D0 + 20 * i, addr, length, kind)
    bp[0x1E8] = len(e820)
    struct.pack_into("<H", bp, 0x1FE, 0xAA55)
    bp[0x202:0x206] = b"HdrS"
    bp[0x210] = 0xFF
    struct.pack_into("<I", bp, 0x228, 0x20000)
    struct.pack_into("<I", bp, 0x238, len(raw))
    struct.pack_into("<Q", bp, 0x70, rsdp)
    mem[0x7000:0x8000] = bytes(bp)
    if firmware:
        mem[0x9FC00:0x100000] = open(firmware, "rb").read()[0x9FC00:0x100000]
    else:
        table = mp_table(cpus, 0x9FC00)
        mem[0x9FC00:0x9FC00 + len(table)] = table


class Machine:
    def __init__(self, args):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm = ioctl(self.kvm, KVM_CREATE_VM, 0)
        try:
            ioctl(self.vm, KVM_SET_TSS_ADDR, 0xFFFBD000)
        except OSError:
            pass
        ioctl(self.vm, KVM_CREATE_IRQCHIP, 0)
        self.size = args.mem << 20
        self.mem = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        region = MemRegion(0, 0, 0, self.size, addr)
        ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region))
        self.entry = load_elf(self.mem, args.elf)
        setup_memory(self.mem, self.size, args.cpus, args.cmdline, args.firmware, args.rsdp)
        self.run_size = ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        self.cpuid = cpuid_buffer(256)
        ioctl(self.kvm, KVM_GET_SUPPORTED_CPUID, ctypes.addressof(self.cpuid))
        self.out_lock = threading.Lock()
        self.start = time.monotonic()
        self.marker = None
        self.vcpus = [self.create_vcpu(i) for i in range(args.cpus)]

    def create_vcpu(self, index):
        fd = ioctl(self.vm, KVM_CREATE_VCPU, index)
        ioctl(fd, KVM_SET_CPUID2, ctypes.addressof(self.cpuid))
        run = mmap.mmap(fd, self.run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if index == 0:
            sregs = Sregs()
            ioctl(fd, KVM_GET_SREGS, ctypes.addressof(sregs))
            code = Segment(0, 0xFFFFF, 0x10, 11, 1, 0, 0, 1, 1, 1, 0, 0, 0)
            data = Segment(0, 0xFFFFF, 0x18, 3, 1, 0, 1, 1, 0, 1, 0, 0, 0)
            sregs.cs = code
            sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
            sregs.gdt.base, sregs.gdt.limit = 0x500, 31
            sregs.idt.base, sregs.idt.limit = 0x520, 7
            sregs.cr0 = 0x80000011  # PG | ET | PE: the guest must fix MP/NE/EM/TS itself
            sregs.cr3 = 0x9000
            sregs.cr4 = 0x20  # PAE
            sregs.efer = 0x500  # LME | LMA
            ioctl(fd, KVM_SET_SREGS, ctypes.addressof(sregs))
            regs = Regs()
            regs.rip, regs.rsi, regs.rsp, regs.rflags = self.entry, 0x7000, 0x8FF0, 2
            ioctl(fd, KVM_SET_REGS, ctypes.addressof(regs))
        return fd, run

    def finish(self, status, why):
        with self.out_lock:
            sys.stdout.flush()
            elapsed = (time.monotonic() - self.start) * 1000
            marker = f", boot marker at {self.marker:.1f} ms" if self.marker is not None else ""
            print(f"[harness] {why}: status {status} after {elapsed:.1f} ms{marker}", file=sys.stderr)
        os._exit(status)

    def run_vcpu(self, index):
        fd, run = self.vcpus[index]
        while True:
            if libc.ioctl(fd, KVM_RUN, 0) < 0:
                err = ctypes.get_errno()
                if err in (4, 11):  # EINTR, EAGAIN
                    continue
                self.finish(103, f"cpu {index} KVM_RUN failed: {os.strerror(err)}")
            reason = struct.unpack_from("<I", run, 8)[0]
            if reason == EXIT_IO:
                direction, size, port, count, offset = struct.unpack_from("<BBHIQ", run, 32)
                self.port_io(run, direction, size, port, count, offset)
            elif reason == EXIT_MMIO:
                addr, = struct.unpack_from("<Q", run, 32)
                if not run[52]:
                    run[40:48] = bytes(8)
            elif reason == EXIT_SHUTDOWN:
                self.finish(100, f"cpu {index} shutdown (triple fault)")
            elif reason == EXIT_HLT:
                time.sleep(3600)
            elif reason != EXIT_INTR:
                self.finish(103, f"cpu {index} unexpected exit reason {reason}")

    def port_io(self, run, direction, size, port, count, offset):
        if direction == 1:  # out
            value = run[offset]
            if port == 0x3F8:
                with self.out_lock:
                    sys.stdout.buffer.write(bytes(run[offset:offset + count]))
                    sys.stdout.flush()
            elif port == 0xF4:
                self.finish(value, "exit device")
            elif port == 0x3F0 and value == 123 and self.marker is None:
                self.marker = (time.monotonic() - self.start) * 1000
            elif port == 0x64 and value == 0xFE:
                self.finish(101, "i8042 reset")
            elif port == 0x600 and value & 0x20:
                self.finish(104, f"ACPI sleep request, SLP_TYP {(value >> 2) & 7}")
            elif port == 0x602:
                self.finish(101, "ACPI reset register")
        else:
            value = 0x60 if port == 0x3FD else 0xFF
            run[offset:offset + size * count] = bytes([value]) * (size * count)

    def main(self, timeout):
        for i in range(len(self.vcpus)):
            threading.Thread(target=self.run_vcpu, args=(i,), daemon=True).start()
        time.sleep(timeout)
        self.finish(102, "timeout")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("elf")
    ap.add_argument("-s", "--cpus", type=int, default=1)
    ap.add_argument("-m", "--mem", type=int, default=128, help="MiB")
    ap.add_argument("-a", "--cmdline", default="")
    ap.add_argument("-t", "--timeout", type=float, default=30)
    ap.add_argument("--firmware", help="low-memory dump with MP/ACPI tables")
    ap.add_argument("--rsdp", type=lambda x: int(x, 0), default=0)
    args = ap.parse_args()
    Machine(args).main(args.timeout)


if __name__ == "__main__":
    main()
