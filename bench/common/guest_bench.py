#!/usr/bin/env python3
"""Block and network throughput: Vessel vs QEMU running the bundled guest's benchmark mode.

`guest_bench.py blk ...` and `guest_bench.py net ...` (normally through bench/block/run.sh and
bench/net/run.sh). Both VMMs boot the very same guest ELF (`--kernel`, PVH) with the same
command line, vCPUs, memory and device settings; the guest measures (TSC, calibrated against
the PIT) and prints `bench blk|net <workload> key=value...` lines on the serial console, which
this script parses. Runs alternate between the VMMs (ABBA order), repeat --runs times after
--warmup-runs unrecorded ones, and the table shows medians with min-max and vessel/qemu ratios.

blk: one raw file (filled with random data first) is the disk of both VMMs. net: a private
network namespace holds a tap (10.0.2.2/24, a permanent neighbour entry for the guest's
10.0.2.15 and MAC) and bench/net/peer.py, the UDP peer; both VMMs run inside it on that tap.
Standard library only. This is a benchmark, not a test: no thresholds.
"""

import argparse
import json
import os
import platform
import re
import selectors
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

from facts import loadavg

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
GUEST_MAC = "52:54:00:12:34:56"
GUEST_IP = "10.0.2.15"
PEER_IP = "10.0.2.2"
PEER_PORT = 7777
LINE_RE = re.compile(r"^bench (blk|net) (\S+) (.*)$")
KV_RE = re.compile(r"(\w+)=(\S+)")
TSC_RE = re.compile(r"^bench tsc (\d+) Hz from (\S+);")

# (workload, metric, label, unit, higher_is_better)
METRICS = {
    "blk": [
        ("randread-4k", "iops", "4 KiB random read", "IOPS", True),
        ("randwrite-4k", "iops", "4 KiB random write", "IOPS", True),
        ("seqread-1m", "MBps", "1 MiB sequential read", "MB/s", True),
        ("seqwrite-1m", "MBps", "1 MiB sequential write", "MB/s", True),
    ],
    "net": [
        ("tx-1472", "pps", "UDP tx 1472 B (guest -> host)", "pkt/s", True),
        ("tx-1472", "MBps", "  payload throughput", "MB/s", True),
        ("tx-1472", "peer_pps", "  of which the peer received (info)", "pkt/s", True),
        ("tx-18", "pps", "UDP tx 18 B (60 B frames)", "pkt/s", True),
        ("tx-18", "peer_pps", "  of which the peer received (info)", "pkt/s", True),
        ("rx-1472", "pps", "UDP rx 1472 B (host -> guest)", "pkt/s", True),
        ("rx-1472", "MBps", "  payload throughput", "MB/s", True),
        ("rx-1472", "peer_pps", "  peer's send rate (info)", "pkt/s", True),
        ("rr-18", "tps", "UDP echo round trips, 18 B", "trips/s", True),
        ("rr-18", "rtt_us", "  mean round trip", "us", False),
    ],
}

_CHILDREN = set()


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Host facts


def read_first(path, prefix):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def first_line(argv):
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=60)
        return (r.stdout or r.stderr).strip().splitlines()[0] if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def host_check(vessel):
    try:
        r = subprocess.run([vessel, "host-check", "--json"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout) if r.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {}


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 256M, 1G)")
    return int(m.group(1)) << {"": 20, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


# ---------------------------------------------------------------------------------------------
# Set-up: the disk file, the network namespace


def make_disk(path, size):
    """A raw file of `size` bytes of random data (written, so every block is allocated)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def sh(argv, check=True):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip()}")
    return r


class NetNs:
    """A network namespace with a persistent tap and the UDP peer; deleted by close()."""

    def __init__(self, name, tap):
        self.name, self.tap, self.peer = name, tap, None
        sh(["ip", "netns", "del", name], check=False)
        sh(["ip", "netns", "add", name])
        self.ip("link set lo up")
        self.ip(f"tuntap add dev {tap} mode tap")
        self.ip(f"addr add {PEER_IP}/24 dev {tap}")
        self.ip(f"link set {tap} up")
        # The host never needs to ARP for the guest during a workload.
        self.ip(f"neigh replace {GUEST_IP} lladdr {GUEST_MAC} dev {tap} nud permanent")

    def ip(self, args):
        sh(["ip", "-n", self.name] + args.split())

    def prefix(self):
        return ["ip", "netns", "exec", self.name]

    def start_peer(self, python):
        self.peer = subprocess.Popen(
            self.prefix() + [python, os.path.join(REPO, "bench/net/peer.py"),
                             "--bind", f"{PEER_IP}:{PEER_PORT}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.peer.stdout.readline()
        if "peer-ready" not in line:
            err = self.peer.stderr.read() if self.peer.poll() is not None else ""
            raise RuntimeError(f"bench/net/peer.py did not start: {line.strip()} {err.strip()}")

    def close(self):
        if self.peer is not None and self.peer.poll() is None:
            self.peer.kill()
            self.peer.wait()
        sh(["ip", "netns", "del", self.name], check=False)


# ---------------------------------------------------------------------------------------------
# One run


def _kill(p):
    if p.poll() is None:
        try:
            p.kill()
        except ProcessLookupError:
            pass
    p.wait()


def run_once(vmm, argv, kind, timeout, env=None):
    """Boot one VM and collect its bench lines: {workload: {key: value}}, plus facts."""
    rec = {"vmm": vmm, "results": {}, "host_gaps_ms": {}}
    out, err = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0, env=env)
    _CHILDREN.add(p)
    last_line_t = None
    try:
        fds = {p.stdout.fileno(): out, p.stderr.fileno(): err}
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        pending = b""
        while fds:
            left = t0 + timeout - time.monotonic()
            if left <= 0:
                rec["error"] = f"timeout after {timeout:.0f} s"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                now = time.monotonic()
                if not chunk:
                    sel.unregister(key.fd)
                    del fds[key.fd]
                    continue
                fds[key.fd] += chunk
                if key.fd != p.stdout.fileno():
                    continue
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").strip()
                    m = TSC_RE.match(line)
                    if m:
                        rec["tsc_hz"], rec["tsc_source"] = int(m.group(1)), m.group(2)
                        last_line_t = now
                        continue
                    m = LINE_RE.match(line)
                    if m and m.group(1) == kind and "=" in m.group(3):
                        vals = {}
                        for k, v in KV_RE.findall(m.group(3)):
                            try:
                                vals[k] = float(v)
                            except ValueError:
                                vals[k] = v
                        if "peer_received" in vals and vals.get("ns"):
                            vals["peer_pps"] = vals["peer_received"] * 1e9 / vals["ns"]
                        rec["results"][m.group(2)] = vals
                        if last_line_t is not None:
                            rec["host_gaps_ms"][m.group(2)] = (now - last_line_t) * 1e3
                        last_line_t = now
                    elif m or line.startswith("bench"):
                        rec.setdefault("info", []).append(line)
                        last_line_t = now
        if "error" not in rec:
            p.wait(timeout=10)
            rec["returncode"] = p.returncode
    except subprocess.TimeoutExpired:
        rec["error"] = "VMM did not exit"
    finally:
        sel.close()
        _kill(p)
        _CHILDREN.discard(p)
        p.stdout.close()
        p.stderr.close()
    text = out.decode(errors="replace")
    fails = [line for line in text.splitlines() if "FAIL" in line]
    if "error" not in rec:
        if fails:
            rec["error"] = fails[0].strip()
        elif rec.get("returncode") != VMMS_EXIT[vmm]:
            rec["error"] = f"exit status {rec.get('returncode')}, expected {VMMS_EXIT[vmm]}"
        elif not rec["results"]:
            rec["error"] = "no bench result lines"
    if "error" in rec:
        rec["stdout_tail"] = text[-600:]
        rec["stderr_tail"] = err.decode(errors="replace")[-600:]
    rec["wall_s"] = time.monotonic() - t0
    return rec


# Vessel exits with the guest's status (0); QEMU's isa-debug-exit with (0 << 1) | 1.
VMMS_EXIT = {"vessel": 0, "qemu": 1}


# ---------------------------------------------------------------------------------------------
# Command lines


def guest_cmdline(args):
    words = [f"bench={args.kind}", f"qd={args.qd}", f"benchtime={args.time_ms}",
             f"benchwarm={args.warm_ms}"]
    if args.kind == "blk" and args.region:
        words.append(f"benchregion={args.region >> 20}M")
    if args.kind == "net":
        words += [f"netip={GUEST_IP}", f"netpeer={PEER_IP}:{PEER_PORT}"]
    return " ".join(words)


def vessel_argv(args, cmdline, prefix):
    argv = prefix + [args.vessel, "run", "--kernel", args.guest, "--cpus", str(args.cpus),
                     "--memory", args.memory, "--console", "stdio", "--transport", args.transport,
                     "--cmdline", cmdline]
    if args.kind == "blk":
        opts = f"path={args.disk},cache={args.cache}"
        if args.vessel_disk_opts:
            opts += "," + args.vessel_disk_opts
        argv += ["--disk", opts]
    else:
        opts = f"tap={args.tap},mac={GUEST_MAC}"
        if args.vessel_net_opts:
            opts += "," + args.vessel_net_opts
        argv += ["--net", opts]
    return argv


def qemu_argv(args, cmdline, prefix):
    pci = args.transport == "pci"
    machine = "microvm,pcie=on" if pci else "microvm"
    if pci:
        # No firmware assigns microvm's PCIe BARs and it has no MCFG: tell the guest.
        cmdline += " pciecam=0xe0000000 pciwindow=0xc0000000"
    argv = prefix + [args.qemu, "-M", machine, "-accel", "kvm", "-cpu", "host",
                     "-smp", str(args.cpus), "-m", args.memory, "-nodefaults", "-no-user-config",
                     "-nographic", "-serial", "stdio",
                     "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                     "-global", "virtio-mmio.force-legacy=false",
                     "-kernel", args.guest, "-append", cmdline]
    if args.kind == "blk":
        drive = f"file={args.disk},format=raw,if=none,id=d0,cache={args.cache},aio={args.qemu_aio}"
        if args.qemu_drive_opts:
            drive += "," + args.qemu_drive_opts
        dev = "virtio-blk-pci" if pci else "virtio-blk-device"
        argv += ["-drive", drive, "-device", f"{dev},drive=d0,num-queues=1"]
    else:
        netdev = f"tap,id=n0,ifname={args.tap},script=no,downscript=no"
        if args.qemu_netdev_opts:
            netdev += "," + args.qemu_netdev_opts
        dev = "virtio-net-pci" if pci else "virtio-net-device"
        argv += ["-netdev", netdev, "-device", f"{dev},netdev=n0,mac={GUEST_MAC}"]
    return argv


# ---------------------------------------------------------------------------------------------
# Report


def collect(records, vmm, workload, metric):
    vals = []
    for r in records:
        if r["vmm"] == vmm and not r.get("warmup") and "error" not in r:
            v = r["results"].get(workload, {}).get(metric)
            if isinstance(v, float):
                vals.append(v)
    return vals


def summarize(records, kind, vmms):
    summary = {}
    for workload, metric, *_ in METRICS[kind]:
        for vmm in vmms:
            v = collect(records, vmm, workload, metric)
            if v:
                summary.setdefault(f"{workload} {metric}", {})[vmm] = {
                    "median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
    return summary


def fmt_num(x):
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}"


def print_table(summary, kind, vmms):
    both = "vessel" in vmms and "qemu" in vmms
    head = ["workload", "unit"] + [f"{v} median [min-max]" for v in vmms]
    head += ["vessel/qemu"] if both else []
    rows = []
    for workload, metric, label, unit, higher in METRICS[kind]:
        s = summary.get(f"{workload} {metric}", {})
        if not s:
            continue
        cells = []
        for v in vmms:
            c = s.get(v)
            cells.append(f"{fmt_num(c['median'])} [{fmt_num(c['min'])}-{fmt_num(c['max'])}]"
                         if c else "-")
        row = [label, unit] + cells
        if both:
            a, b = s.get("vessel"), s.get("qemu")
            ratio = f"{a['median'] / b['median']:.2f}" if a and b and b["median"] else "-"
            row.append(ratio + ("" if higher else "*"))
        rows.append(row)
    if not rows:
        print("no successful runs to report")
        return
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    if both:
        print("(vessel/qemu: ratio of medians; above 1 = Vessel faster; * lower is better)")


def clock_check(records, args):
    """Guest-measured time vs host-observed time between result lines, per VMM."""
    out = {}
    for vmm in ("vessel", "qemu"):
        ratios = []
        for r in records:
            if r["vmm"] != vmm or "error" in r:
                continue
            for w, gap in r["host_gaps_ms"].items():
                ns = r["results"].get(w, {}).get("ns")
                if isinstance(ns, float) and gap > 0:
                    ratios.append((ns / 1e6 + args.warm_ms) / gap)
        if ratios:
            out[vmm] = statistics.median(ratios)
    return out


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["blk", "net"])
    ap.add_argument("--runs", type=int, default=5, help="recorded runs per VMM (default 5)")
    ap.add_argument("--warmup-runs", type=int, default=1,
                    help="unrecorded runs per VMM first (default 1)")
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs for both VMMs (default 1)")
    ap.add_argument("--memory", default="256M", help="guest memory (default 256M)")
    ap.add_argument("--time-ms", type=int, default=2000, help="measured time per workload")
    ap.add_argument("--warm-ms", type=int, default=200, help="guest warm-up per workload")
    ap.add_argument("--qd", type=int, default=32,
                    help="requests (blk) / frames (net tx) in flight (default 32)")
    ap.add_argument("--transport", choices=["mmio", "pci"], default="mmio",
                    help="virtio-mmio (QEMU -M microvm) or virtio-pci (-M microvm,pcie=on)")
    ap.add_argument("--vessel", required=True)
    ap.add_argument("--guest", required=True, help="the bundled guest's ELF")
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "qemu-system-x86_64"))
    ap.add_argument("--no-qemu", action="store_true", help="Vessel only")
    ap.add_argument("--timeout", type=float, default=0, help="per run, seconds (default: auto)")
    ap.add_argument("--json", help="write every run and the summary here")
    ap.add_argument("--python", default=sys.executable, help="python for the net peer")
    blk = ap.add_argument_group("blk")
    blk.add_argument("--dir", default="/var/tmp", help="where the disk file goes")
    blk.add_argument("--disk-size", type=parse_size, default=1 << 30,
                     help="disk file size (default 1G)")
    blk.add_argument("--region", type=parse_size, default=0,
                     help="bytes of the disk the workloads use (default: all)")
    blk.add_argument("--cache", choices=["writeback", "unsafe"], default="writeback",
                     help="host cache mode for both VMMs (default writeback)")
    blk.add_argument("--qemu-aio", choices=["threads", "io_uring"], default="threads",
                     help="QEMU's -drive aio= (default threads)")
    blk.add_argument("--vessel-disk-opts", default=os.environ.get("VESSEL_DISK_OPTS", ""),
                     help="extra Vessel --disk options, e.g. an engine (env VESSEL_DISK_OPTS)")
    blk.add_argument("--qemu-drive-opts", default=os.environ.get("QEMU_DRIVE_OPTS", ""),
                     help="extra QEMU -drive options (env QEMU_DRIVE_OPTS)")
    net = ap.add_argument_group("net")
    net.add_argument("--vessel-net-opts", default=os.environ.get("VESSEL_NET_OPTS", ""),
                     help="extra Vessel --net options (env VESSEL_NET_OPTS)")
    net.add_argument("--qemu-netdev-opts", default=os.environ.get("QEMU_NETDEV_OPTS", ""),
                     help="extra QEMU -netdev tap options (env QEMU_NETDEV_OPTS)")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, _on_signal)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        die("/dev/kvm is missing or not accessible")
    for path, what in ((args.vessel, "vessel"), (args.guest, "guest ELF")):
        if not os.access(path, os.X_OK if what == "vessel" else os.R_OK):
            die(f"{what} not found: {path}")
    vmms = ["vessel"]
    if not args.no_qemu:
        q = shutil.which(args.qemu)
        if not q:
            die(f"{args.qemu} not found (Debian: apt-get install qemu-system-x86), "
                "or pass --no-qemu for Vessel alone")
        args.qemu = q
        vmms.append("qemu")
    if args.kind == "net":
        if os.geteuid() != 0:
            die("the net benchmark needs root (network namespace, tap)")
        if not shutil.which("ip"):
            die("ip (iproute2) not found (Debian: apt-get install iproute2)")
        if not os.path.exists("/dev/net/tun"):
            die("/dev/net/tun is missing")
    per_run = 4 * (args.time_ms + args.warm_ms) / 1000
    timeout = args.timeout or per_run * 3 + 60

    hc = host_check(args.vessel)
    facts = {
        "cpu": read_first("/proc/cpuinfo", "model name"), "host_cpus": os.cpu_count(),
        "kernel": platform.release(), "loadavg_start": loadavg(),
        "kvm_module": hc.get("kvm_module"), "ring0_native": hc.get("ring0_native"),
        "vessel": f"{args.vessel} ({first_line([args.vessel, '--version']) or '?'})",
        "qemu": f"{args.qemu} ({first_line([args.qemu, '--version']) or '?'})"
        if "qemu" in vmms else None,
        "guest": args.guest, "kind": args.kind,
    }

    ns = None
    prefix = []
    env = dict(os.environ, NO_COLOR="1")
    records = []
    t_start = time.monotonic()
    try:
        if args.kind == "blk":
            os.makedirs(args.dir, exist_ok=True)
            args.disk = os.path.join(args.dir, f"vessel-bench-{os.getpid()}.raw")
            print(f"writing {args.disk_size >> 20} MiB of random data to {args.disk}...",
                  file=sys.stderr)
            make_disk(args.disk, args.disk_size)
            settings = (f"disk {args.disk} ({args.disk_size >> 20} MiB raw), cache={args.cache} "
                        f"for both; vessel --disk {args.vessel_disk_opts or '(defaults)'}; "
                        f"qemu aio={args.qemu_aio}{',' + args.qemu_drive_opts if args.qemu_drive_opts else ''}, "
                        "num-queues=1")
        else:
            args.tap = f"vbt{os.getpid() % 100000}"
            ns = NetNs(f"vessel-bench-{os.getpid()}", args.tap)
            ns.start_peer(args.python)
            prefix = ns.prefix()
            settings = (f"tap {args.tap} in netns {ns.name}, peer bench/net/peer.py on "
                        f"{PEER_IP}:{PEER_PORT}; vessel --net {args.vessel_net_opts or '(defaults)'}"
                        f"; qemu -netdev tap {args.qemu_netdev_opts or '(vhost off)'}")
        cmdline = guest_cmdline(args)
        argvs = {"vessel": vessel_argv(args, cmdline, prefix),
                 "qemu": qemu_argv(args, cmdline, prefix) if "qemu" in vmms else None}

        print(f"Vessel {args.kind} benchmark: the bundled guest's bench={args.kind}, "
              "Vessel vs QEMU")
        print(f"  cpu:      {facts['cpu']} ({facts['host_cpus']} host CPUs), "
              f"kernel {facts['kernel']}")
        print(f"  kvm:      {facts['kvm_module']}, ring0_native={facts['ring0_native']}")
        print(f"  load:     {facts['loadavg_start']} (1/5/15-min load average at start)")
        print(f"  vessel:   {facts['vessel']}")
        if facts["qemu"]:
            print(f"  qemu:     {facts['qemu']}, -M {'microvm,pcie=on' if args.transport == 'pci' else 'microvm'}")
        print(f"  guest:    {args.guest}, cmdline '{cmdline}'")
        print(f"  settings: {args.runs} runs (+{args.warmup_runs} warm-up) per VMM, "
              f"--cpus {args.cpus}, --memory {args.memory}, virtio-{args.transport}; {settings}")
        sys.stdout.flush()
        for name in vmms:
            print(f"  {name} argv: {shlex.join(argvs[name])}", file=sys.stderr)

        given_up = set()
        for i in range(args.warmup_runs + args.runs):
            order = vmms if i % 2 == 0 else vmms[::-1]
            for name in order:
                if name in given_up:
                    continue
                rec = run_once(name, argvs[name], args.kind, timeout, env)
                rec["run"] = i
                if i < args.warmup_runs:
                    rec["warmup"] = True
                records.append(rec)
                tag = "warm-up" if i < args.warmup_runs else f"run {i - args.warmup_runs + 1}"
                if "error" in rec:
                    print(f"  {name} {tag}: {rec['error']}", file=sys.stderr)
                    for k in ("stdout_tail", "stderr_tail"):
                        if rec.get(k, "").strip():
                            print("    " + rec[k].strip().replace("\n", "\n    "),
                                  file=sys.stderr)
                    fails = sum(1 for r in records if r["vmm"] == name and "error" in r)
                    if fails >= 3:
                        given_up.add(name)
                        print(f"  {name}: giving up after 3 failed runs", file=sys.stderr)
                else:
                    print(f"  {name} {tag}: " + ", ".join(
                        f"{w} {fmt_metrics(v)}" for w, v in rec["results"].items()),
                        file=sys.stderr)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted ({str(e) or 'Ctrl-C'}); reporting what was measured",
              file=sys.stderr)
    except RuntimeError as e:
        die(str(e))
    finally:
        for p in list(_CHILDREN):
            _kill(p)
        if ns is not None:
            ns.close()
        if args.kind == "blk" and getattr(args, "disk", None) and os.path.exists(args.disk):
            os.unlink(args.disk)

    summary = summarize(records, args.kind, vmms)
    print()
    print_table(summary, args.kind, vmms)
    checks = clock_check(records, args)
    if checks:
        print("guest clock vs host clock (guest-timed + warm-up over host-observed, per "
              "workload, median; ~1 = TSC calibration agrees): "
              + ", ".join(f"{k} {v:.3f}" for k, v in checks.items()))
    rescues = {n: sum(int(v.get("rescues", 0)) for r in records if r["vmm"] == n
                      for v in r["results"].values()) for n in vmms}
    if any(rescues.values()):
        print("gaps of 100 ms without a completion, after which the guest notified again "
              "(on a busy host usually the VMM's threads not running): "
              + ", ".join(f"{n} {c}" for n, c in rescues.items()))
    failed = {n: sum(1 for r in records if r["vmm"] == n and "error" in r) for n in vmms}
    if any(failed.values()):
        print("failed runs: " + ", ".join(f"{n} {c}" for n, c in failed.items() if c))
    facts["loadavg_end"] = loadavg()
    print(f"wall time {time.monotonic() - t_start:.0f} s; load average at end "
          f"{facts['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "host_check": hc, "settings": vars(args) | {},
                       "summary": summary, "runs": records}, f, indent=1, default=str)
        print(f"raw results written to {args.json}")
    ok = any(r["vmm"] == "vessel" and "error" not in r and not r.get("warmup") for r in records)
    return 0 if ok else 1


def fmt_metrics(v):
    keys = [k for k in ("iops", "MBps", "pps", "tps", "rtt_us") if k in v]
    return " ".join(f"{k}={fmt_num(v[k])}" for k in keys)


if __name__ == "__main__":
    sys.exit(main())
