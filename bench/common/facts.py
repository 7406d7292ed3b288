"""Machine facts and small helpers shared by the Python benchmark drivers (bench/boot,
bench/snapshot, bench/common/guest_bench.py): the CPU model, the load average, running a
command for its output, Vessel's `host-check --json`, and Vessel's size syntax."""

import argparse
import json
import platform
import re
import subprocess


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def run_text(argv, timeout=30):
    """(exit status or None, stdout, stderr) of `argv`."""
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        return r.returncode, r.stdout, r.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "", str(e)


def host_check(vessel):
    """`vessel host-check --json` as a dict, or {"error": why}."""
    rc, out, err = run_text([vessel, "host-check", "--json"], timeout=60)
    if rc != 0:
        return {"error": (err or out).strip() or f"exit status {rc}"}
    try:
        return json.loads(out)
    except ValueError as e:
        return {"error": f"cannot parse host-check output: {e}"}


def parse_size(text):
    """Vessel's/QEMU's size syntax: 512M, 2G, 1024K; a plain number is MiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 128M, 1G)")
    n, unit = int(m.group(1)), (m.group(2) or "M").upper()
    return n << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]
