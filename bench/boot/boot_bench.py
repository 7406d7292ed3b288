#!/usr/bin/env python3
"""Boot-time and memory-overhead benchmark: Vessel vs QEMU (microvm) on the bundled guest.

Both VMMs boot the very same guest ELF (Vessel embeds it; QEMU loads it through its PVH note).
Per repetition and per VMM this runs the guest twice:

  * with `action=hold` (the guest spins in ring 3 after its last line): measures exec -> banner
    (the boot marker is written right after it), exec -> "all N cpus ran in ring 3", and then
    samples /proc/PID/smaps for the VMM's memory beyond guest RAM; then kills the VMM;
  * with `action=exit` (exit device at 0xf4): measures exec -> process exit (reaped).

Timestamps are time.perf_counter_ns() taken just before subprocess.Popen and right after the
os.read() on the stdout pipe that returned the awaited bytes. Standard library only.
This is a benchmark, not a test: it reports numbers and has no thresholds.
"""

import argparse
import glob
import json
import os
import platform
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from facts import cpu_model, host_check, loadavg, parse_size, run_text  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BANNER = b"Vessel guest"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MARKER_RE = re.compile(r"guest boot marker after ([0-9.]+) ms")
SMAPS_HDR = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")

# The child currently running, so that signal handlers / finally blocks can always reap it.
_CHILDREN = set()


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# ---------------------------------------------------------------------------------------------
# Machine facts


def qemu_version(qemu):
    rc, out, _ = run_text([qemu, "--version"])
    return out.splitlines()[0].strip() if rc == 0 and out else "unknown"


def find_guest_elf(vessel):
    """The guest ELF that is byte-for-byte the one embedded in the vessel binary, if any."""
    cands = glob.glob(os.path.join(REPO, "target/release/build/vessel-*/out/vessel-guest.elf"))
    cands += glob.glob(os.path.join(REPO, "target/guest/release/vessel-guest"))
    cands.sort(key=os.path.getmtime, reverse=True)
    if not cands:
        return None, False
    try:
        with open(vessel, "rb") as f:
            blob = f.read()
    except OSError:
        return cands[0], False
    for c in cands:
        with open(c, "rb") as f:
            if f.read() in blob:
                return c, True
    return cands[0], False


# ---------------------------------------------------------------------------------------------
# Memory


def read_smaps(pid):
    """Mappings of a process: dicts with start, size (bytes), perms, path, rss, anon (KiB)."""
    maps, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = SMAPS_HDR.match(line)
            if m:
                cur = {"start": int(m.group(1), 16), "size": int(m.group(2), 16) - int(m.group(1), 16),
                       "perms": m.group(3), "path": m.group(4).strip(), "rss": 0, "anon": 0}
                maps.append(cur)
            elif cur is not None:
                if line.startswith("Rss:"):
                    cur["rss"] = int(line.split()[1])
                elif line.startswith("Anonymous:"):
                    cur["anon"] = int(line.split()[1])
    return maps


def _ram_like(m):
    p = m["path"]
    anonymous = p == "" or p.startswith("[anon:") or p.startswith("/memfd:") \
        or p.startswith("/dev/zero") or p.startswith("/SYSV")
    return anonymous and m["perms"].startswith("rw")


def guest_ram_mappings(maps, mem_bytes):
    """The mapping(s) that hold guest RAM.

    First choice: one RAM-like (anonymous or memfd, read-write) mapping whose size is the guest
    memory size, allowing some slack for alignment or a merged neighbour. Otherwise (RAM split in
    several mappings, e.g. around the 32-bit hole): the largest RAM-like mappings that add up to
    the guest memory size within that slack. Returns [] when nothing fits.
    """
    slack = max(2 << 20, mem_bytes // 64)
    cands = sorted((m for m in maps if _ram_like(m)), key=lambda m: m["size"], reverse=True)
    single = [m for m in cands if mem_bytes <= m["size"] <= mem_bytes + slack]
    if single:
        return [min(single, key=lambda m: m["size"] - mem_bytes)]
    picked, total = [], 0
    for m in cands:
        if total + m["size"] > mem_bytes + slack:
            continue
        picked.append(m)
        total += m["size"]
        if total >= mem_bytes - slack:
            return picked
    return []


def memory_sample(pid, mem_bytes):
    maps = read_smaps(pid)
    guest = guest_ram_mappings(maps, mem_bytes)
    total = sum(m["rss"] for m in maps)
    anon = sum(m["anon"] for m in maps)
    g_rss = sum(m["rss"] for m in guest)
    g_anon = sum(m["anon"] for m in guest)
    s = {
        "total_rss_kib": total,
        "guest_maps": [{"size_kib": m["size"] >> 10, "rss_kib": m["rss"], "path": m["path"]}
                       for m in guest],
        "mappings": len(maps),
    }
    if guest:
        s["guest_ram_rss_kib"] = g_rss
        s["overhead_rss_kib"] = total - g_rss
        s["overhead_anon_kib"] = anon - g_anon
    else:
        s["error"] = "guest RAM mapping not identified"
    return s


# ---------------------------------------------------------------------------------------------
# One run


def _kill(p, sig):
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def run_once(vmm, argv, mode, cpus, mem_bytes, timeout, settle_s):
    """Boots one VM; returns a dict of measurements (times in ms, memory in KiB)."""
    final = b"all %d cpus ran in ring 3" % cpus
    rec = {"vmm": vmm["name"], "mode": mode}
    out, err = bytearray(), bytearray()
    t_banner = t_all = None
    sel = selectors.DefaultSelector()
    t0 = time.perf_counter_ns()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0, env=vmm.get("env"))
    _CHILDREN.add(p)
    try:
        open_fds = {p.stdout.fileno(): out, p.stderr.fileno(): err}
        for fd in open_fds:
            sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while open_fds:
            if mode == "hold" and t_all is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                rec["error"] = f"timeout after {timeout:.0f} s"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                now = time.perf_counter_ns()
                if not chunk:
                    sel.unregister(key.fd)
                    del open_fds[key.fd]
                    continue
                buf = open_fds[key.fd]
                buf += chunk
                if buf is out:
                    if t_banner is None and BANNER in out:
                        t_banner = now
                    if t_all is None and final in out:
                        t_all = now
        if mode == "hold" and t_all is not None:
            if settle_s:
                time.sleep(settle_s)
            try:
                rec["memory"] = memory_sample(p.pid, mem_bytes)
            except OSError as e:
                rec["memory"] = {"error": f"cannot read smaps: {e}"}
            _kill(p, vmm["stop_signal"])
        elif mode == "exit" and "error" not in rec:
            p.wait()
            rec["exit_ms"] = (time.perf_counter_ns() - t0) / 1e6
            if t_all is not None:
                rec["teardown_ms"] = rec["exit_ms"] - (t_all - t0) / 1e6
            rec["returncode"] = p.returncode
            if p.returncode != vmm["exit_status"]:
                rec["error"] = f"exit status {p.returncode}, expected {vmm['exit_status']}"
        # Collect whatever stderr is left (vessel's boot-marker log line).
        end = time.monotonic() + 2
        while p.stderr.fileno() in open_fds and time.monotonic() < end:
            if not sel.select(0.2 if p.poll() is None else 0.05):
                if p.poll() is not None:
                    break
                continue
            chunk = os.read(p.stderr.fileno(), 65536)
            if not chunk:
                break
            err += chunk
    finally:
        sel.close()
        _kill(p, signal.SIGKILL)
        _CHILDREN.discard(p)
        for f in (p.stdout, p.stderr):
            f.close()
    if t_banner is not None:
        rec["banner_ms"] = (t_banner - t0) / 1e6
    if t_all is not None:
        rec["all_cpus_ms"] = (t_all - t0) / 1e6
    m = MARKER_RE.search(ANSI.sub("", err.decode(errors="replace")))
    if m:
        rec["self_marker_ms"] = float(m.group(1))
    if "error" not in rec:
        if t_banner is None:
            rec["error"] = "no banner line"
        elif t_all is None:
            rec["error"] = "no 'all cpus' line"
    if "error" in rec:
        rec["stdout_tail"] = out.decode(errors="replace")[-400:]
        rec["stderr_tail"] = ANSI.sub("", err.decode(errors="replace"))[-400:]
    return rec


# ---------------------------------------------------------------------------------------------
# Report


METRICS = [
    # key, label, source mode, scale, unit
    ("banner_ms", "exec -> boot marker (banner line)", "hold", 1, "ms"),
    ("self_marker_ms", "  vessel's own marker log (from main())", "hold", 1, "ms"),
    ("all_cpus_ms", "exec -> all CPUs ready", "hold", 1, "ms"),
    ("exit_ms", "exec -> guest exit, VMM reaped", "exit", 1, "ms"),
    ("teardown_ms", "  last guest line -> VMM reaped", "exit", 1, "ms"),
    ("overhead_rss_kib", "RSS beyond guest memory", "hold", 1 / 1024, "MiB"),
    ("overhead_anon_kib", "  of which anonymous (heap, stacks...)", "hold", 1 / 1024, "MiB"),
    ("total_rss_kib", "total RSS", "hold", 1 / 1024, "MiB"),
    ("guest_ram_rss_kib", "  guest RAM resident (info)", "hold", 1 / 1024, "MiB"),
]


def values(records, vmm, key, mode):
    vals = []
    for r in records:
        if r["vmm"] != vmm or r["mode"] != mode or r.get("warmup") or "error" in r:
            continue
        v = r.get(key, r.get("memory", {}).get(key))
        if v is not None:
            vals.append(v)
    return vals


def summarize(records, vmms):
    summary = {}
    for key, _label, mode, _scale, _unit in METRICS:
        summary[key] = {}
        for name in vmms:
            v = values(records, name, key, mode)
            if v:
                summary[key][name] = {"median": statistics.median(v), "min": min(v),
                                      "max": max(v), "n": len(v)}
    return summary


def fmt_cell(s, scale, unit):
    if not s:
        return "-"
    digits = 2 if unit == "ms" else 1
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def print_table(summary, vmms):
    cols = [f"{n} median [min-max]" for n in vmms]
    has_ratio = "vessel" in vmms and "qemu" in vmms
    rows = []
    for key, label, _mode, scale, unit in METRICS:
        cells = [fmt_cell(summary[key].get(n), scale, unit) for n in vmms]
        if all(c == "-" for c in cells):
            continue
        ratio = ""
        if has_ratio:
            a, b = summary[key].get("vessel"), summary[key].get("qemu")
            ratio = f"{a['median'] / b['median']:.2f}" if a and b and b["median"] else "-"
        rows.append([label, unit] + cells + ([ratio] if has_ratio else []))
    head = ["metric", "unit"] + cols + (["vessel/qemu"] if has_ratio else [])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    if not rows:
        print("no successful runs to report")
        return
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    if has_ratio:
        print("(vessel/qemu: ratio of medians; lower is better for vessel)")


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="repetitions per VMM (default 10)")
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    ap.add_argument("--memory", default="128M", help="guest memory (default 128M)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unrecorded warm-up repetitions per VMM (default 1)")
    ap.add_argument("--timeout", type=float, default=30, help="per-boot timeout, s (default 30)")
    ap.add_argument("--settle-ms", type=float, default=0,
                    help="wait this long after the last guest line before sampling smaps (default 0)")
    ap.add_argument("--vessel", default=os.path.join(REPO, "target/release/vessel"),
                    help="vessel binary (default target/release/vessel; run.sh --build rebuilds it)")
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "qemu-system-x86_64"),
                    help="QEMU binary (default $QEMU or qemu-system-x86_64)")
    ap.add_argument("--guest", help="guest ELF for QEMU (default: the one embedded in vessel)")
    ap.add_argument("--no-qemu", action="store_true", help="benchmark vessel only")
    ap.add_argument("--json", metavar="FILE", help="write raw results and summary to FILE")
    args = ap.parse_args()
    if args.runs < 1 or args.cpus < 1:
        ap.error("--runs and --cpus must be at least 1")
    mem_bytes = parse_size(args.memory)
    mem_arg = f"{mem_bytes >> 20}M"

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    if not os.access(args.vessel, os.X_OK):
        print(f"error: {args.vessel} not found; build it with cargo build --release -p vessel",
              file=sys.stderr)
        return 2

    hc = host_check(args.vessel)
    _, vver, _ = run_text([args.vessel, "--version"])
    notes = []

    vessel_env = dict(os.environ, NO_COLOR="1")
    vessel_env.pop("VESSEL_LOG", None)
    vmms = {
        "vessel": {
            "name": "vessel",
            "argv": lambda action: [args.vessel, "--log-level", "info", "run",
                                    "--cpus", str(args.cpus), "--memory", mem_arg,
                                    "--console", "stdio", "--cmdline", f"action={action}"],
            "stop_signal": signal.SIGTERM,
            "exit_status": 0,
            "env": vessel_env,
        }
    }

    qemu = None if args.no_qemu else shutil.which(args.qemu)
    guest, guest_matches = (args.guest, None) if args.guest else find_guest_elf(args.vessel)
    qver = None
    if args.no_qemu:
        notes.append("qemu: skipped (--no-qemu)")
    elif not qemu:
        notes.append(f"qemu: {args.qemu} not found -- showing vessel only "
                     "(Debian: apt-get install qemu-system-x86)")
    elif not guest:
        notes.append("qemu: no guest ELF found (build vessel, or pass --guest) -- vessel only")
    else:
        qver = qemu_version(qemu)
        if guest_matches is False:
            notes.append(f"warning: {guest} is not byte-identical to the guest embedded in "
                         "vessel (stale build?)")
        vmms["qemu"] = {
            "name": "qemu",
            "argv": lambda action: [qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host",
                                    "-smp", str(args.cpus), "-m", mem_arg, "-nodefaults",
                                    "-no-user-config", "-nographic", "-serial", "stdio",
                                    "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                                    "-kernel", guest, "-append", f"action={action}"],
            "stop_signal": signal.SIGKILL,
            "exit_status": 1,  # isa-debug-exit: (0 << 1) | 1
        }

    facts = {
        "cpu_model": cpu_model(),
        "host_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_start": loadavg(),
        "kvm_module": hc.get("kvm_module"),
        "ring0_native": hc.get("ring0_native"),
        "ring0_ns_per_instruction": hc.get("ring0_ns_per_instruction"),
        "verdict": hc.get("verdict") or hc.get("error"),
        "vessel": f"{args.vessel} ({vver.strip() or 'unknown version'})",
        "qemu": f"{qemu} ({qver})" if qver else None,
        "guest_elf": guest if "qemu" in vmms else None,
        "settings": {"runs": args.runs, "warmup": args.warmup, "cpus": args.cpus,
                     "memory": mem_arg, "settle_ms": args.settle_ms},
    }

    print("Vessel boot benchmark: exec -> boot marker / all CPUs / exit, and VMM memory overhead")
    print(f"  cpu:      {facts['cpu_model']} ({facts['host_cpus']} host CPUs)")
    print(f"  kernel:   {facts['kernel']}")
    print(f"  kvm:      {facts['kvm_module']}, ring0_native={facts['ring0_native']}"
          + (f" ({facts['ring0_ns_per_instruction']:.0f} ns per ring-0 instruction)"
             if isinstance(facts['ring0_ns_per_instruction'], (int, float)) else ""))
    print(f"  verdict:  {facts['verdict']}")
    if facts["ring0_native"] is False:
        print("  note:     guest ring 0 is emulated on this host; the guest's ring-0 part and "
              "QEMU's PVH\n            firmware/option ROM (ring 0) are slowed by it, "
              "ring-3 guest code is not")
    print(f"  load:     {facts['loadavg_start']} (1/5/15-min load average at start; other work on "
          "the host skews times)")
    print(f"  vessel:   {facts['vessel']}")
    if facts["qemu"]:
        print(f"  qemu:     {facts['qemu']}, -M microvm, guest {os.path.relpath(guest, REPO)}")
    print(f"  settings: {args.runs} runs (+{args.warmup} warm-up) per VMM, "
          f"--cpus {args.cpus}, --memory {mem_arg}, same guest ELF and cmdline for both")
    for n in notes:
        print(f"  {n}")
    print(flush=True)

    records = []
    settle = args.settle_ms / 1000
    t_start = time.monotonic()
    try:
        given_up, streak = set(), {n: 0 for n in vmms}
        for i in range(args.warmup + args.runs):
            for name, vmm in vmms.items():
                for mode in ("hold", "exit"):
                    if name in given_up:
                        continue
                    rec = run_once(vmm, vmm["argv"](mode), mode, args.cpus, mem_bytes,
                                   args.timeout, settle)
                    rec["rep"] = i - args.warmup
                    if i < args.warmup:
                        rec["warmup"] = True
                    records.append(rec)
                    if "error" in rec or "error" in rec.get("memory", {}):
                        e = rec.get("error") or rec["memory"]["error"]
                        run = "warm-up" if i < args.warmup else f"run {i - args.warmup}"
                        print(f"  {name} {mode} {run}: {e}", file=sys.stderr)
                        if "stderr_tail" in rec and rec["stderr_tail"].strip():
                            print("    stderr: " + rec["stderr_tail"].strip()
                                  .replace("\n", "\n    stderr: "), file=sys.stderr)
                        streak[name] += 1
                        if e.startswith("timeout") or streak[name] >= 3:
                            given_up.add(name)
                            notes.append(f"{name}: gave up after {e}")
                            print(f"  {name}: giving up", file=sys.stderr)
                    else:
                        streak[name] = 0
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted ({str(e) or 'Ctrl-C'}); reporting what was measured", file=sys.stderr)
    finally:
        for p in list(_CHILDREN):
            _kill(p, signal.SIGKILL)
    elapsed = time.monotonic() - t_start

    summary = summarize(records, list(vmms))
    print_table(summary, list(vmms))
    guest_maps = {}
    for r in records:
        gm = r.get("memory", {}).get("guest_maps")
        if gm and r["vmm"] not in guest_maps:
            guest_maps[r["vmm"]] = ", ".join(f"{m['size_kib'] >> 10} MiB" for m in gm)
    if guest_maps:
        print("guest RAM mapping(s) subtracted: "
              + "; ".join(f"{k}: {v}" for k, v in guest_maps.items()))
    failed = {n: sum(1 for r in records if r["vmm"] == n and not r.get("warmup")
                     and ("error" in r or "error" in r.get("memory", {}))) for n in vmms}
    if any(failed.values()):
        print("failed runs: " + ", ".join(f"{n} {c}" for n, c in failed.items() if c))
    facts["loadavg_end"] = loadavg()
    print(f"wall time {elapsed:.1f} s; load average at end {facts['loadavg_end']}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "host_check": hc, "notes": notes, "summary": summary,
                       "runs": records}, f, indent=1)
        print(f"raw results written to {args.json}")
    ok = any(r["vmm"] == "vessel" and "error" not in r and not r.get("warmup") for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
