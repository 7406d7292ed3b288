"""Density benchmark for `vessel daemon` (see run.sh): N VMs of the bundled guest, idle
(`action=idle`: every vCPU parked in hlt), created and started through the daemon's API from
one template with a base disk (each VM gets its own thin qcow2 overlay)."""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "common"))
import facts  # noqa: E402


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=120)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def call(sock, method, path, body=None):
    c = UnixHTTP(sock)
    data = json.dumps(body).encode() if body is not None else None
    c.request(method, path, body=data, headers={"content-type": "application/json"})
    r = c.getresponse()
    text = r.read()
    c.close()
    if r.status >= 400:
        raise RuntimeError(f"{method} {path}: {r.status} {text.decode(errors='replace')}")
    return json.loads(text) if text else None


def kib(pid, field):
    """A field of /proc/PID/status or smaps_rollup, in KiB (0 if the process is gone)."""
    for name in (f"/proc/{pid}/smaps_rollup", f"/proc/{pid}/status"):
        try:
            with open(name) as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vessel", required=True)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--memory", default="64M", help="guest RAM per VM")
    ap.add_argument("--parallel", type=int, default=8, help="API requests at once")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="vessel-density-")
    state, run = os.path.join(work, "state"), os.path.join(work, "run")
    sock = os.path.join(run, "vessel.sock")
    daemon = subprocess.Popen(
        [a.vessel, "daemon", "--state-dir", state, "--run-dir", run, "--socket", sock],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                call(sock, "GET", "/api/v1/ping")
                break
            except OSError:
                time.sleep(0.05)
        base = os.path.join(work, "base.qcow2")
        subprocess.run([a.vessel, "image", "create", base, "64M"], check=True,
                       stdout=subprocess.DEVNULL)
        call(sock, "POST", "/api/v1/templates", {
            "name": "tiny",
            "spec": {"memory": a.memory, "boot": {"cmdline": "console=ttyS0 action=idle"}},
            "base_disks": [base]})
        names = [f"vm{i:03}" for i in range(a.vms)]
        daemon_before = kib(daemon.pid, "Rss")

        t0 = time.monotonic()
        with ThreadPoolExecutor(a.parallel) as pool:
            views = list(pool.map(lambda n: call(sock, "POST", "/api/v1/vms", {
                "name": n, "template": "tiny", "start": True}), names))
        all_running = time.monotonic() - t0
        running = [v for v in call(sock, "GET", "/api/v1/vms") if v["state"] == "running"]
        assert len(running) == a.vms, f"{len(running)} of {a.vms} running"

        time.sleep(1)
        pids = [v["pid"] for v in running]
        rss = [kib(p, "Rss") for p in pids]
        pss = [kib(p, "Pss") for p in pids]
        anon = [kib(p, "Anonymous") for p in pids]
        lat = []
        for _ in range(20):
            t = time.monotonic()
            call(sock, "GET", "/api/v1/vms")
            lat.append((time.monotonic() - t) * 1000)
        daemon_rss = kib(daemon.pid, "Rss")

        t0 = time.monotonic()
        with ThreadPoolExecutor(a.parallel) as pool:
            list(pool.map(lambda n: call(sock, "PUT", f"/api/v1/vms/{n}/kill", {}), names))
            list(pool.map(lambda n: call(sock, "DELETE", f"/api/v1/vms/{n}"), names))
        stop_delete = time.monotonic() - t0

        out = {
            "vms": a.vms,
            "guest_memory": a.memory,
            "cpu": facts.cpu_model(),
            "load_before": facts.loadavg(),
            "time_to_all_running_s": round(all_running, 2),
            "per_vm_start_ms": round(all_running * 1000 / a.vms, 1),
            "vm_process_rss_mib_median": round(statistics.median(rss) / 1024, 2),
            "vm_process_pss_mib_median": round(statistics.median(pss) / 1024, 2),
            "vm_process_anon_mib_median": round(statistics.median(anon) / 1024, 2),
            "all_vms_pss_mib": round(sum(pss) / 1024, 1),
            "daemon_rss_mib": round(daemon_rss / 1024, 1),
            "daemon_rss_before_mib": round(daemon_before / 1024, 1),
            "list_ms_median": round(statistics.median(lat), 2),
            "list_ms_max": round(max(lat), 2),
            "kill_and_delete_all_s": round(stop_delete, 2),
        }
        print(f"{a.vms} VMs of the bundled guest ({a.memory} each, idle), {a.parallel} requests at once")
        print(f"  time to all running       {out['time_to_all_running_s']} s "
              f"({out['per_vm_start_ms']} ms per VM)")
        print(f"  per VM process (median)   RSS {out['vm_process_rss_mib_median']} MiB, "
              f"PSS {out['vm_process_pss_mib_median']} MiB, anonymous "
              f"{out['vm_process_anon_mib_median']} MiB (guest RAM included as touched)")
        print(f"  all VM processes          PSS {out['all_vms_pss_mib']} MiB")
        print(f"  daemon                    RSS {out['daemon_rss_mib']} MiB "
              f"({out['daemon_rss_before_mib']} MiB with no VM)")
        print(f"  list {a.vms} VMs             median {out['list_ms_median']} ms, "
              f"max {out['list_ms_max']} ms")
        print(f"  kill and delete all       {out['kill_and_delete_all_s']} s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        daemon.terminate()
        daemon.wait()
        # Anything left (a failed run): end it.
        subprocess.run(["pkill", "-KILL", "-f", "--", f"--config {state}/"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
