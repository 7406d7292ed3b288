#!/usr/bin/env python3
"""Snapshot/restore and live-migration benchmark: Vessel vs QEMU (microvm) on the bundled guest.

Both VMMs run the very same guest ELF (Vessel embeds it; QEMU loads it through its PVH note)
with the same command line. Vessel is driven through its REST API (HTTP over its Unix socket),
QEMU through QMP (JSON over a Unix socket); the console of every VMM is read from its stdout by
a thread that stamps each line with time.perf_counter_ns() as it arrives.

  * snapshot: a soaking guest is snapshotted (Vessel: vm.snapshot; QEMU: stop, migrate to a
    file descriptor of a regular file, cont) -- how long the VM is paused;
  * restore: an idle VMM process (vessel serve; qemu -incoming defer) restores that snapshot
    (Vessel: vm.restore, lazy, eager or userfaultfd; QEMU: migrate-incoming from the file, then cont) --
    request -> "running" and request -> the guest's next console line;
  * migration: source and target on this host over TCP on 127.0.0.1, for an idle guest
    (action=hold), a lightly and a busily dirtying guest (action=soak) -- total time and
    downtime as each VMM reports them, the gap in the console seen from outside, and QEMU's
    STOP/RESUME event timestamps; with --post-copy, the soaking guests again with post-copy
    switched on at the end of the first pass (Vessel: post_copy_after_rounds 1; QEMU:
    migrate-start-postcopy near the end of its first pass) -- also request -> running on the
    target, the post-copy phase and the pages fetched on demand.

Standard library only. A benchmark, not a test: it reports numbers and has no thresholds.
See README.md for the exact definitions.
"""

import argparse
import contextlib
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from facts import cpu_model, host_check, loadavg, parse_size, run_text  # noqa: E402

SOAK_RE = re.compile(rb"soak cpu=(\d+) iter=(\d+) t=(\d+) sum=0x[0-9a-f]+ ok")
TOUCH_RE = re.compile(rb"touch: (\d+) MiB at")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
QEMU_BANDWIDTH = 100 << 30  # bytes/s: "unlimited" (QEMU's default cap is 128 MiB/s)
POLL_POSTCOPY = 0.005  # s: Vessel's migration status polled this often in post-copy runs


class Failure(Exception):
    pass


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def now_ns():
    return time.perf_counter_ns()


def ms(a, b):
    return (b - a) / 1e6


# ---------------------------------------------------------------------------------------------
# Machine facts: bench/common/facts.py


def size_name(b):
    return f"{b >> 30}G" if b % (1 << 30) == 0 else f"{b >> 20}M"


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def allocated_mib(path):
    total = 0
    for root, _dirs, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total / (1 << 20)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Child processes with timestamped console lines

_CHILDREN = set()


class Vmm:
    """A VMM process; a thread reads its stdout into (perf_counter_ns, line) pairs."""

    def __init__(self, name, argv, env=None):
        self.name = name
        self.argv = argv
        self.lines = []
        self.err = bytearray()
        self.cond = threading.Condition()
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        _CHILDREN.add(self)
        self.threads = [threading.Thread(target=self._read_out, daemon=True),
                        threading.Thread(target=self._read_err, daemon=True)]
        for t in self.threads:
            t.start()

    def _read_out(self):
        fd, pending = self.p.stdout.fileno(), b""
        while True:
            chunk = os.read(fd, 65536)
            t = now_ns()
            if not chunk:
                break
            pending += chunk
            *done, pending = pending.split(b"\n")
            if done:
                with self.cond:
                    self.lines.extend((t, ln) for ln in done)
                    self.cond.notify_all()
        with self.cond:
            if pending:
                self.lines.append((now_ns(), pending))
            self.cond.notify_all()

    def _read_err(self):
        fd = self.p.stderr.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            with self.cond:
                self.err += chunk

    def mark(self):
        with self.cond:
            return len(self.lines)

    def wait_line(self, pred, start=0, timeout=60, what="a console line"):
        """The first (index, time, line) at or after `start` for which pred(line) holds."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, ln = self.lines[i]
                    if b"MISMATCH" in ln or ln.startswith(b"FAIL"):
                        raise Failure(f"{self.name}: guest says {ln.decode(errors='replace')}")
                    if pred(ln):
                        return i, t, ln
                    i += 1
                if self.p.poll() is not None:
                    self.cond.wait(0.2)  # let the reader drain the pipe
                    if i >= len(self.lines):
                        raise Failure(f"{self.name} exited with status {self.p.returncode} "
                                      f"while waiting for {what}; {self.tail()}")
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"{self.name}: no {what} after {timeout:.0f} s; {self.tail()}")
                self.cond.wait(min(left, 0.5))

    def tail(self):
        with self.cond:
            out = b"\n".join(ln for _, ln in self.lines[-4:]).decode(errors="replace")
            err = ANSI.sub("", self.err.decode(errors="replace")).strip()[-600:]
        return f"console: ...{out[-300:]!r}; stderr: {err!r}"

    def stop(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            try:
                self.p.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        for t in self.threads:
            t.join(timeout=2)
        for f in (self.p.stdout, self.p.stderr):
            f.close()
        _CHILDREN.discard(self)


def soak_line(ln):
    return SOAK_RE.search(ln) is not None


def soak_t(ln):
    m = SOAK_RE.search(ln)
    return int(m.group(3)) if m else None


def wait_socket(vmm, path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if vmm.p.poll() is not None:
            raise Failure(f"{vmm.name} exited with status {vmm.p.returncode} before its "
                          f"socket {path} appeared; {vmm.tail()}")
        if time.monotonic() > deadline:
            raise Failure(f"{vmm.name}: {path} did not appear within {timeout} s")
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------
# Vessel's API (HTTP/1.1 over a Unix socket, one request per connection)


def vessel_api(sock, method, route, body=None, timeout=300):
    data = b"" if body is None else json.dumps(body).encode()
    req = (f"{method} /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    shown = dict(body, token="...") if isinstance(body, dict) and "token" in body else body
    what = f"{method} /api/v1/{route}" + (f" {json.dumps(shown)}" if body is not None else "")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(sock)
        s.sendall(req + data)
        resp = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
    except OSError as e:
        raise Failure(f"vessel API {sock}: {what}: {e}") from e
    finally:
        s.close()
    head, _, payload = bytes(resp).partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise Failure(f"vessel API {sock}: {what}: bad response {bytes(resp[:200])!r}")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        payload = out
    doc = None
    if payload.strip():
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = {"raw": payload.decode(errors="replace")}
    if status >= 400:
        msg = doc.get("message", doc) if isinstance(doc, dict) else doc
        raise Failure(f"vessel API: {what} -> HTTP {status}: {msg}")
    return doc


# ---------------------------------------------------------------------------------------------
# QMP


class Qmp:
    """A QMP connection: commands one at a time; a thread files events with arrival times."""

    def __init__(self, vmm, path, timeout=30):
        wait_socket(vmm, path, timeout)
        self.vmm = vmm
        deadline = time.monotonic() + timeout
        while True:
            self.s = socket.socket(socket.AF_UNIX)
            try:
                self.s.connect(path)
                break
            except OSError as e:  # bound but not listening yet
                self.s.close()
                if vmm.p.poll() is not None or time.monotonic() > deadline:
                    raise Failure(f"{vmm.name}: QMP socket {path}: {e}; {vmm.tail()}")
                time.sleep(0.005)
        self.f = self.s.makefile("rb")
        greeting = json.loads(self.f.readline() or b"{}")
        if "QMP" not in greeting:
            raise Failure(f"{vmm.name}: no QMP greeting on {path}")
        self.events = []
        self.replies = queue.Queue()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.cmd("qmp_capabilities")

    def _read(self):
        try:
            for line in self.f:
                t = now_ns()
                msg = json.loads(line)
                if "event" in msg:
                    with self.cond:
                        self.events.append((t, msg))
                        self.cond.notify_all()
                else:
                    self.replies.put(msg)
        except (OSError, ValueError):
            pass
        self.replies.put(None)
        with self.cond:
            self.cond.notify_all()

    def cmd(self, name, args=None, fds=None, timeout=300):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        data = json.dumps(msg).encode()
        if fds:
            socket.send_fds(self.s, [data], fds)
        else:
            self.s.sendall(data)
        try:
            r = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise Failure(f"{self.vmm.name}: QMP {name}: no reply in {timeout} s")
        if r is None:
            raise Failure(f"{self.vmm.name}: QMP connection closed during {name}; "
                          f"{self.vmm.tail()}")
        if "error" in r:
            raise Failure(f"{self.vmm.name}: QMP {json.dumps(msg)} -> {r['error']}")
        return r.get("return")

    def mark(self):
        with self.cond:
            return len(self.events)

    def wait_event(self, pred, start=0, timeout=300, what="event"):
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.events):
                    t, ev = self.events[i]
                    if pred(ev):
                        return t, ev
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    raise Failure(f"{self.vmm.name}: no {what} within {timeout} s; "
                                  f"{self.vmm.tail()}")
                self.cond.wait(min(left, 0.5))

    def wait_migration(self, start, timeout):
        """Waits for the MIGRATION event that ends a migration; fails unless completed."""
        _, ev = self.wait_event(
            lambda e: e["event"] == "MIGRATION"
            and e["data"]["status"] in ("completed", "failed", "cancelled"),
            start, timeout, "end of migration")
        st = ev["data"]["status"]
        if st != "completed":
            info = self.cmd("query-migrate")
            raise Failure(f"{self.vmm.name}: migration {st}: {info.get('error-desc', info)}")
        return now_ns()

    def cont(self, timeout=30):
        """`cont` once the migration has finished moving the run state on (the MIGRATION
        completed event comes just before: `cont` then fails with "not finalized yet")."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.cmd("cont")
            except Failure as e:
                if "not finalized" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(0.0005)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def event_time(ev):
    ts = ev["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


# ---------------------------------------------------------------------------------------------
# The two VMMs


@contextlib.contextmanager
def cleanup_on_error(vmm):
    try:
        yield
    except BaseException:
        stop_all(vmm)
        raise


class Setup:
    def __init__(self, args, workdir, guest):
        self.args = args
        self.workdir = workdir
        self.guest = guest
        self.env = dict(os.environ, NO_COLOR="1")
        self.env.pop("VESSEL_LOG", None)
        self.n = 0

    def path(self, name):
        self.n += 1
        return os.path.join(self.workdir, f"{self.n}-{name}")

    # Vessel
    def vessel_boot(self, mem, cmdline):
        api = self.path("vessel.sock")
        v = Vmm("vessel", [self.args.vessel, "--log-level", "warn", "run",
                           "--kernel", self.guest, "--cpus", str(self.args.cpus),
                           "--memory", f"{mem >> 20}M",
                           "--console", "stdio", "--api-socket", api, "--cmdline", cmdline],
                env=self.env)
        v.api = api
        with cleanup_on_error(v):
            wait_socket(v, api, self.args.timeout)
        return v

    def vessel_serve(self):
        api = self.path("vessel-serve.sock")
        v = Vmm("vessel serve", [self.args.vessel, "--log-level", "warn", "serve",
                                 "--api-socket", api, "--console", "stdio"], env=self.env)
        v.api = api
        with cleanup_on_error(v):
            wait_socket(v, api, self.args.timeout)
            deadline = time.monotonic() + self.args.timeout
            while True:  # the socket file exists a moment before the server listens on it
                try:
                    vessel_api(api, "GET", "ping")
                    break
                except Failure:
                    if v.p.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
        return v

    # QEMU
    def qemu(self, mem, cmdline, incoming=False):
        qmp = self.path("qmp.sock")
        argv = [self.args.qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host",
                "-smp", str(self.args.cpus), "-m", f"{mem >> 20}M", "-nodefaults",
                "-no-user-config", "-nographic", "-serial", "stdio",
                "-kernel", self.guest, "-append", cmdline,
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer"]
        q = Vmm("qemu" + (" -incoming" if incoming else ""), argv)
        q.qmp = None
        with cleanup_on_error(q):
            q.qmp = Qmp(q, qmp, self.args.timeout)
            q.qmp.cmd("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True}]})
        return q


def ready_pred(cmdline):
    """The console line after which a guest with this command line is doing its action."""
    if "action=soak" in cmdline:
        return soak_line
    if "touch=" in cmdline and "touch=0 " not in cmdline + " ":
        return lambda ln: TOUCH_RE.search(ln) is not None
    return lambda ln: b"cpus ran in ring 3" in ln


def check_touch(vmm, want_mib):
    """The guest's `touch:` line must say it wrote what was asked (it caps at its RAM)."""
    if not want_mib:
        return
    _, _, ln = vmm.wait_line(lambda x: TOUCH_RE.search(x) is not None, 0, 5, "touch line")
    got = int(TOUCH_RE.search(ln).group(1))
    if got != want_mib:
        raise Failure(f"{vmm.name}: guest touched {got} MiB, {want_mib} asked")


def stop_all(*vmms):
    for v in vmms:
        if v is None:
            continue
        if getattr(v, "qmp", None):
            v.qmp.close()
        v.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Snapshot and restore


def restore_cmdline(args, mem):
    return f"action=soak soakms={args.soakms} touch={touch_mib(args, mem)}"


def touch_mib(args, mem):
    return (mem >> 20) * args.touch_pct // 100


def vessel_snapshots(st, mem, reps):
    """Boots a soaking guest, snapshots it `reps` times; keeps the first snapshot."""
    cmdline = restore_cmdline(st.args, mem)
    recs, keep = [], None
    v = st.vessel_boot(mem, cmdline)
    try:
        v.wait_line(ready_pred(cmdline), 0, st.args.timeout, "the soak workload")
        check_touch(v, touch_mib(st.args, mem))
        time.sleep(st.args.settle)
        for rep in range(reps):
            d = st.path(f"vessel-{size_name(mem)}-snap")
            rec = {"phase": "snapshot", "vmm": "vessel", "size": size_name(mem), "rep": rep}
            try:
                t0 = now_ns()
                vessel_api(v.api, "PUT", "vm.snapshot", {"dir": d}, st.args.timeout)
                rec["pause_ms"] = ms(t0, now_ns())
                rec["file_mib"] = allocated_mib(d)
                mark = v.mark()
                v.wait_line(soak_line, mark, st.args.timeout, "a soak line after the snapshot")
            except Failure as e:
                rec["error"] = str(e)
            recs.append(rec)
            if keep is None and "error" not in rec:
                keep = d
            elif os.path.exists(d):
                shutil.rmtree(d)
    finally:
        stop_all(v)
    return keep, recs


def qemu_snapshots(st, mem, reps):
    cmdline = restore_cmdline(st.args, mem)
    recs, keep = [], None
    q = st.qemu(mem, cmdline)
    try:
        q.qmp.cmd("migrate-set-parameters", {"max-bandwidth": QEMU_BANDWIDTH})
        q.wait_line(ready_pred(cmdline), 0, st.args.timeout, "the soak workload")
        check_touch(q, touch_mib(st.args, mem))
        time.sleep(st.args.settle)
        for rep in range(reps):
            path = st.path(f"qemu-{size_name(mem)}.mig")
            rec = {"phase": "snapshot", "vmm": "qemu", "size": size_name(mem), "rep": rep}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                ev = q.qmp.mark()
                t0 = now_ns()
                q.qmp.cmd("stop")
                q.qmp.cmd("getfd", {"fdname": "snap"}, fds=[fd])
                q.qmp.cmd("migrate", {"uri": "fd:snap"})
                q.qmp.wait_migration(ev, st.args.timeout)
                q.qmp.cont()
                t1 = now_ns()
                os.fsync(fd)
                t2 = now_ns()
                rec["pause_ms"] = ms(t0, t1)
                rec["pause_fsync_ms"] = ms(t0, t2)
                rec["file_mib"] = allocated_mib(path)
                mark = q.mark()
                q.wait_line(soak_line, mark, st.args.timeout, "a soak line after the snapshot")
            except Failure as e:
                rec["error"] = str(e)
            finally:
                os.close(fd)
            recs.append(rec)
            if keep is None and "error" not in rec:
                keep = path
            elif os.path.exists(path):
                os.unlink(path)
    finally:
        stop_all(q)
    return keep, recs


def after_restore(vmm, t0, rec, timeout):
    """Waits for the restored guest's first console line, then for one more (it runs on)."""
    i, t, ln = vmm.wait_line(soak_line, 0, timeout, "the restored guest's first soak line")
    rec["first_line_ms"] = ms(t0, t)
    vmm.wait_line(soak_line, i + 1, timeout, "a second soak line")
    rec["rss_mib"] = rss_mib(vmm.p.pid)


def vessel_restore(st, snap, mem, mode, rep):
    rec = {"phase": "restore", "vmm": "vessel", "size": size_name(mem), "mode": mode, "rep": rep}
    v = None
    try:
        v = st.vessel_serve()
        t0 = now_ns()
        vessel_api(v.api, "PUT", "vm.restore", {"dir": snap, "memory": mode}, st.args.timeout)
        rec["api_ms"] = ms(t0, now_ns())
        after_restore(v, t0, rec, st.args.timeout)
    except Failure as e:
        rec["error"] = str(e)
    finally:
        stop_all(v)
    return rec


def qemu_restore(st, snap, mem, rep):
    rec = {"phase": "restore", "vmm": "qemu", "size": size_name(mem), "mode": "file", "rep": rep}
    q = None
    fd = os.open(snap, os.O_RDONLY)
    try:
        q = st.qemu(mem, restore_cmdline(st.args, mem), incoming=True)
        ev = q.qmp.mark()
        t0 = now_ns()
        q.qmp.cmd("getfd", {"fdname": "snap"}, fds=[fd])
        q.qmp.cmd("migrate-incoming", {"uri": "fd:snap"})
        rec["loaded_ms"] = ms(t0, q.qmp.wait_migration(ev, st.args.timeout))
        # The snapshot was taken with the VM stopped, so QEMU stays paused after loading it.
        q.qmp.cont()
        rec["api_ms"] = ms(t0, now_ns())
        after_restore(q, t0, rec, st.args.timeout)
    except Failure as e:
        rec["error"] = str(e)
    finally:
        os.close(fd)
        stop_all(q)
    return rec


# ---------------------------------------------------------------------------------------------
# Live migration


SCENARIOS = {
    "idle": "action=hold",
    "light": "action=soak soakms={soakms}",
    "busy": "action=soak soakms={soakms} work={work} soakpages={pages}",
}


def migration_cmdline(args, scenario, mem):
    base = SCENARIOS[scenario].format(soakms=args.soakms, work=args.busy_work,
                                      pages=args.busy_pages)
    return f"{base} touch={touch_mib(args, args.mig_memory)}"


def console_gap(src, dst, t0, rec, timeout):
    """For a soaking guest: the target's first line, the source's last line before it."""
    i, t_first, ln = dst.wait_line(soak_line, 0, timeout, "the target's first soak line")
    rec["first_line_ms"] = ms(t0, t_first)
    with src.cond:
        before = [(t, l) for t, l in src.lines if soak_line(l) and t < t_first]
    if not before:
        raise Failure("no soak line from the source before the target's first")
    t_last, last = before[-1]
    rec["gap_ms"] = ms(t_last, t_first)
    rec["tsc_gap_ms"] = soak_t(ln) - soak_t(last)
    dst.wait_line(soak_line, i + 1, timeout, "the target's second soak line")


def checked_after(dst, mark, args, scenario):
    """Post-copy: the guest on the target checks its whole work buffer (every window of
    `soakpages` pages, one per iteration) after the last page arrived (console line `mark`)."""
    busy = scenario == "busy"
    windows = 512 * (args.busy_work if busy else 1) // (args.busy_pages if busy else 16)

    def cpu0_iter(ln):
        m = SOAK_RE.search(ln)
        return int(m.group(2)) if m and m.group(1) == b"0" else None

    _, _, ln = dst.wait_line(lambda x: cpu0_iter(x) is not None, mark, args.timeout,
                             "a soak line after the post-copy")
    done = cpu0_iter(ln) + windows
    dst.wait_line(lambda x: (cpu0_iter(x) or 0) >= done, mark, args.timeout,
                  f"the soak line of iteration {done} (every window checked)")


def vessel_migrate(st, scenario, rep, post_copy=False):
    mem, args = st.args.mig_memory, st.args
    cmdline = migration_cmdline(args, scenario, mem)
    rec = {"phase": "migration", "vmm": "vessel", "scenario": scenario, "rep": rep,
           "mode": "postcopy" if post_copy else "precopy"}
    src = dst = None
    try:
        src = st.vessel_boot(mem, cmdline)
        dst = st.vessel_serve()
        src.wait_line(ready_pred(cmdline), 0, args.timeout, "the guest's workload")
        check_touch(src, touch_mib(args, mem))
        time.sleep(args.settle)
        addr = f"tcp:127.0.0.1:{free_port()}"
        # The target makes the migration's token (older Vessels answer 204 and need none).
        recv = vessel_api(dst.api, "PUT", "vm.migrate-receive", {"listen": addr})
        # As QEMU, never give up on a busy guest: stop and copy after the last round.
        req = {"to": addr, "downtime_ms": args.downtime_ms, "if_not_converged": "stop-and-copy"}
        if isinstance(recv, dict) and "token" in recv:
            req["token"] = recv["token"]
        if post_copy:  # forced right after the first full copy, converged or not
            req.update(post_copy=True, post_copy_after_rounds=1)
        t0 = now_ns()
        vessel_api(src.api, "PUT", "vm.migrate-send", req)
        deadline = time.monotonic() + args.timeout
        status, t_postcopy = None, None
        while True:
            try:
                status = vessel_api(src.api, "GET", "vm.migration-status", timeout=10)
            except Failure:
                if src.p.poll() is not None:
                    raise Failure(f"the source exited (status {src.p.returncode}) before its "
                                  f"migration status said completed; last status {status}")
                raise
            if status["phase"] == "postcopy" and t_postcopy is None:
                t_postcopy = now_ns()  # the VM runs on the target
            if status["phase"] in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise Failure(f"migration not finished after {args.timeout} s: {status}")
            time.sleep(POLL_POSTCOPY if post_copy else 0.01)
        t_done = now_ns()
        rec["done_ms"] = ms(t0, t_done)
        if status["phase"] != "completed":
            raise Failure(f"vessel migration {status['phase']}: {status.get('error')} "
                          f"(PUT vm.migrate-send {json.dumps(dict(req, token='...'))})")
        rec["total_ms"] = status["elapsed_ms"]
        rec["downtime_ms"] = status.get("downtime_ms")
        rec["transferred_mib"] = status["transferred_bytes"] / (1 << 20)
        rec["rounds"] = status["round"]
        if t_postcopy is not None:
            rec["running_ms"] = ms(t0, t_postcopy)
            rec["postcopy_ms"] = ms(t_postcopy, t_done)
        mark = dst.mark()
        try:
            src.p.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise Failure("the source did not exit after a completed migration")
        if src.p.returncode != 0:
            raise Failure(f"the source exited with status {src.p.returncode}; {src.tail()}")
        if "action=soak" in cmdline:
            console_gap(src, dst, t0, rec, args.timeout)
        if post_copy:
            checked_after(dst, mark, args, scenario)
        info = vessel_api(dst.api, "GET", "vm.info")
        if info.get("state") != "running":
            raise Failure(f"target not running after the migration: {info.get('state')}")
        if post_copy:
            pager = info.get("pager")
            if not pager:
                raise Failure(f"no post-copy: the target has no pager (vm.info {info})")
            rec["faults"] = pager["faults"]
            rec["fetched_mib"] = pager["copied_pages"] * 4096 / (1 << 20)
    except Failure as e:
        rec["error"] = str(e)
    finally:
        stop_all(src, dst)
    return rec


def qemu_start_postcopy(src, ev_src, rec, args):
    """Sends migrate-start-postcopy near the end of QEMU's first pass: once `ram.remaining`
    (polled) is at most --qemu-switch-mib, or at its MIGRATION_PASS 2 event with 0. QEMU
    switches at the end of the iteration in flight (see README.md). Returns the send time."""
    left = args.qemu_switch_mib << 20
    while True:
        if left == 0:
            _, ev = src.qmp.wait_event(
                lambda e: (e["event"] == "MIGRATION_PASS" and e["data"]["pass"] >= 2)
                or (e["event"] == "MIGRATION"
                    and e["data"]["status"] in ("completed", "failed", "cancelled")),
                ev_src, args.timeout, "the end of the first pass")
            status, rem = ev["data"].get("status", "active"), None
        else:
            info = src.qmp.cmd("query-migrate")
            status, rem = info.get("status"), info.get("ram", {}).get("remaining")
        if status not in ("setup", "active"):
            raise Failure(f"qemu migration {status} before the switch to post-copy")
        if left == 0 or (rem is not None and rem <= left):
            break
        time.sleep(POLL_POSTCOPY)
    t = now_ns()
    src.qmp.cmd("migrate-start-postcopy")
    if rem is not None:
        rec["switch_left_mib"] = rem / (1 << 20)
    return t


def qemu_migrate(st, scenario, rep, post_copy=False):
    """QEMU's pre-copy, or its post-copy switched on near the end of its first pass (see
    README.md)."""
    mem, args = st.args.mig_memory, st.args
    cmdline = migration_cmdline(args, scenario, mem)
    rec = {"phase": "migration", "vmm": "qemu", "scenario": scenario, "rep": rep,
           "mode": "postcopy" if post_copy else "precopy"}
    src = dst = None
    try:
        src = st.qemu(mem, cmdline)
        dst = st.qemu(mem, cmdline, incoming=True)
        downtime_limit = args.downtime_ms
        if post_copy:
            for q in (src, dst):
                q.qmp.cmd("migrate-set-capabilities",
                          {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
            # A 1 ms limit keeps pre-copy from converging (and completing without post-copy)
            # at the end of the first pass; the switch-over itself does not look at it.
            downtime_limit = 1
        src.qmp.cmd("migrate-set-parameters", {"max-bandwidth": QEMU_BANDWIDTH,
                                               "downtime-limit": downtime_limit})
        src.wait_line(ready_pred(cmdline), 0, args.timeout, "the guest's workload")
        check_touch(src, touch_mib(args, mem))
        time.sleep(args.settle)
        uri = f"tcp:127.0.0.1:{free_port()}"
        dst.qmp.cmd("migrate-incoming", {"uri": uri})
        ev_src, ev_dst = src.qmp.mark(), dst.qmp.mark()
        t0 = now_ns()
        src.qmp.cmd("migrate", {"uri": uri})
        if post_copy:
            t_cmd = qemu_start_postcopy(src, ev_src, rec, args)
            t_switch, ev = src.qmp.wait_event(
                lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in (
                    "postcopy-active", "completed", "failed", "cancelled"),
                ev_src, args.timeout, "postcopy-active on the source")
            if ev["data"]["status"] != "postcopy-active":
                raise Failure(f"qemu migration {ev['data']['status']} without post-copy")
            rec["switch_ms"] = ms(t_cmd, t_switch)
            t_run, _ = dst.qmp.wait_event(lambda e: e["event"] == "RESUME", ev_dst,
                                          args.timeout, "RESUME on the target")
        t_done = src.qmp.wait_migration(ev_src, args.timeout)
        rec["done_ms"] = ms(t0, t_done)
        if post_copy:
            rec["running_ms"] = ms(t0, t_run)
            rec["postcopy_ms"] = ms(t_run, t_done)
            mark = dst.mark()
        # The MIGRATION event comes just before QEMU fills in total-time and downtime.
        deadline = time.monotonic() + 5
        while True:
            info = src.qmp.cmd("query-migrate")
            if info.get("total-time") or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        ram = info.get("ram", {})
        rec["total_ms"] = info.get("total-time")
        rec["downtime_ms"] = info.get("downtime")
        rec["transferred_mib"] = ram.get("transferred", 0) / (1 << 20)
        rec["rounds"] = ram.get("dirty-sync-count")
        if post_copy:
            if rec["downtime_ms"] and rec["total_ms"] and rec["downtime_ms"] > rec["total_ms"]:
                # QEMU 7.2 takes a post-copy downtime of 0 ms (under 1 ms) for "not set" and
                # reports its clock since boot instead.
                rec["downtime_ms"], rec["downtime_reported"] = 0, info.get("downtime")
            rec["faults"] = ram.get("postcopy-requests")
            if "postcopy-bytes" in ram:
                rec["fetched_mib"] = ram["postcopy-bytes"] / (1 << 20)
        else:
            rec["setup_ms"] = info.get("setup-time")
        _, resume = dst.qmp.wait_event(lambda e: e["event"] == "RESUME", ev_dst,
                                       args.timeout, "RESUME on the target")
        _, stop = src.qmp.wait_event(lambda e: e["event"] == "STOP", ev_src, 5,
                                     "STOP on the source")
        rec["event_downtime_ms"] = (event_time(resume) - event_time(stop)) * 1000
        if "action=soak" in cmdline:
            console_gap(src, dst, t0, rec, args.timeout)
        if post_copy:
            checked_after(dst, mark, args, scenario)
        status = dst.qmp.cmd("query-status")
        if status.get("status") != "running":
            raise Failure(f"target not running after the migration: {status}")
    except Failure as e:
        rec["error"] = str(e)
    finally:
        stop_all(src, dst)
    return rec


# ---------------------------------------------------------------------------------------------
# Report


def summarize(records, match, key):
    vals = [r[key] for r in records
            if all(r.get(k) == v for k, v in match.items()) and "error" not in r
            and r.get(key) is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def cell(s, digits):
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def table(title, rows, records):
    """rows: (label, unit, digits, vessel match, qemu match, key for vessel, key for qemu)."""
    out = []
    for label, unit, digits, vm, qm, vkey, qkey in rows:
        a = summarize(records, vm, vkey) if vm is not None else None
        b = summarize(records, qm, qkey) if qm is not None else None
        if a is None and b is None:
            continue
        ratio = f"{a['median'] / b['median']:.2f}" if a and b and b["median"] else "-"
        out.append([label, unit, cell(a, digits), cell(b, digits), ratio])
    if not out:
        return
    head = [title, "unit", "vessel median [min-max]", "qemu median [min-max]", "vessel/qemu"]
    widths = [max(len(r[i]) for r in out + [head]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in out:
        print(line(r))
    print()


def report(records, args):
    sizes = [size_name(s) for s in args.sizes]
    if any(r["phase"] == "restore" for r in records):
        rows = []
        for s in sizes:
            q = {"phase": "restore", "vmm": "qemu", "size": s}
            for mode in ("lazy", "eager", "userfaultfd"):
                v = {"phase": "restore", "vmm": "vessel", "size": s, "mode": mode}
                rows += [
                    (f"{s} {mode}: request -> running", "ms", 1, v, q, "api_ms", "api_ms"),
                    ("  request -> first guest line", "ms", 1, v, q, "first_line_ms",
                     "first_line_ms"),
                    ("  VMM RSS after restore", "MiB", 0, v, q, "rss_mib", "rss_mib"),
                ]
            rows.append(("  (qemu: file loaded, before cont)", "ms", 1, None, q, None,
                         "loaded_ms"))
        table("restore (qemu: the same runs in both rows)", rows, records)
    if any(r["phase"] == "snapshot" for r in records):
        rows = []
        for s in sizes:
            v = {"phase": "snapshot", "vmm": "vessel", "size": s}
            q = {"phase": "snapshot", "vmm": "qemu", "size": s}
            rows += [
                (f"{s}: VM paused for the snapshot", "ms", 1, v, q, "pause_ms", "pause_ms"),
                ("  qemu + fsync of its file", "ms", 1, v, q, "pause_ms", "pause_fsync_ms"),
                ("  file size on disk", "MiB", 0, v, q, "file_mib", "file_mib"),
            ]
        table("snapshot (vessel's includes its fsync)", rows, records)
    if any(r["phase"] == "migration" for r in records):
        rows = []
        for sc in args.scenarios:
            v = {"phase": "migration", "vmm": "vessel", "scenario": sc, "mode": "precopy"}
            q = {"phase": "migration", "vmm": "qemu", "scenario": sc, "mode": "precopy"}
            rows += [
                (f"{sc}: total time (VMM's report)", "ms", 0, v, q, "total_ms", "total_ms"),
                ("  downtime (VMM's report)", "ms", 0, v, q, "downtime_ms", "downtime_ms"),
                ("  console gap, src last -> dst first line", "ms", 0, v, q, "gap_ms",
                 "gap_ms"),
                ("  guest TSC gap across the move", "ms", 0, v, q, "tsc_gap_ms", "tsc_gap_ms"),
                ("  qemu STOP(src) -> RESUME(dst) events", "ms", 0, None, q, None,
                 "event_downtime_ms"),
                ("  request -> dst first guest line", "ms", 0, v, q, "first_line_ms",
                 "first_line_ms"),
                ("  transferred", "MiB", 0, v, q, "transferred_mib", "transferred_mib"),
                ("  rounds / dirty syncs", "", 0, v, q, "rounds", "rounds"),
            ]
        for sc in args.scenarios:
            v = {"phase": "migration", "vmm": "vessel", "scenario": sc, "mode": "postcopy"}
            q = {"phase": "migration", "vmm": "qemu", "scenario": sc, "mode": "postcopy"}
            rows += [
                (f"{sc} post-copy: total time (VMM's report)", "ms", 0, v, q, "total_ms",
                 "total_ms"),
                ("  downtime (VMM's report)", "ms", 0, v, q, "downtime_ms", "downtime_ms"),
                ("  console gap, src last -> dst first line", "ms", 0, v, q, "gap_ms",
                 "gap_ms"),
                ("  guest TSC gap across the move", "ms", 0, v, q, "tsc_gap_ms", "tsc_gap_ms"),
                ("  qemu STOP(src) -> RESUME(dst) events", "ms", 0, None, q, None,
                 "event_downtime_ms"),
                ("  request -> running on the target", "ms", 0, v, q, "running_ms",
                 "running_ms"),
                ("  request -> dst first guest line", "ms", 0, v, q, "first_line_ms",
                 "first_line_ms"),
                ("  post-copy phase: running -> completed", "ms", 0, v, q, "postcopy_ms",
                 "postcopy_ms"),
                ("  (qemu: first pass left at start-postcopy)", "MiB", 0, None, q, None,
                 "switch_left_mib"),
                ("  (qemu: start-postcopy -> postcopy-active)", "ms", 0, None, q, None,
                 "switch_ms"),
                ("  transferred", "MiB", 0, v, q, "transferred_mib", "transferred_mib"),
                ("  moved after the switch", "MiB", 0, v, q, "fetched_mib", "fetched_mib"),
                ("  page faults / postcopy-requests", "", 0, v, q, "faults", "faults"),
                ("  rounds / dirty syncs", "", 0, v, q, "rounds", "rounds"),
            ]
        table(f"migration ({size_name(args.mig_memory)}, tcp 127.0.0.1)", rows, records)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="repetitions (default 5)")
    ap.add_argument("--snapshot-runs", type=int, default=3,
                    help="snapshots taken per VMM and size (default 3)")
    ap.add_argument("--sizes", default="128M,1G,4G",
                    help="guest sizes for snapshot/restore (default 128M,1G,4G)")
    ap.add_argument("--mig-memory", default="1G", help="guest size for migration (default 1G)")
    ap.add_argument("--scenarios", default="idle,light,busy",
                    help="migration guests: idle (action=hold), light (soak), busy "
                         "(soak with work= and soakpages=); default all three")
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    ap.add_argument("--touch-pct", type=int, default=50,
                    help="percent of guest memory the guest writes once at boot (touch=), "
                         "its resident set (default 50)")
    ap.add_argument("--soakms", type=int, default=10,
                    help="soak report period, ms: the console's time resolution (default 10)")
    ap.add_argument("--busy-work", type=int, default=16,
                    help="busy migration: work= (the dirty set is 2 MiB x work per vCPU; "
                         "default 16)")
    ap.add_argument("--busy-pages", type=int, default=64,
                    help="busy migration: soakpages= (default 64)")
    ap.add_argument("--downtime-ms", type=int, default=300,
                    help="downtime limit for both VMMs (default 300, both defaults)")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds the guest runs before a snapshot/migration (default 0.5)")
    ap.add_argument("--timeout", type=float, default=180, help="per-step timeout, s")
    ap.add_argument("--post-copy", action="store_true",
                    help="also migrate each soaking scenario (light, busy) with post-copy, "
                         "switched on after the first pass by both VMMs")
    ap.add_argument("--post-copy-only", action="store_true",
                    help="post-copy runs only (implies --post-copy)")
    ap.add_argument("--qemu-switch-mib", type=int, default=64,
                    help="post-copy: QEMU gets migrate-start-postcopy once its first pass has "
                         "this many MiB left (0: at the end of the pass, MIGRATION_PASS 2; "
                         "default 64)")
    ap.add_argument("--skip-restore", action="store_true", help="no snapshot/restore runs")
    ap.add_argument("--skip-migration", action="store_true", help="no migration runs")
    ap.add_argument("--workdir", help="where snapshots go (default: a new directory in "
                                      "/var/tmp, removed at the end)")
    ap.add_argument("--vessel", required=True, help="vessel binary")
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "qemu-system-x86_64"))
    ap.add_argument("--guest", required=True,
                    help="the bundled guest's ELF, booted by both VMMs (PVH)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run's numbers")
    ap.add_argument("--json", metavar="FILE", help="write every run and the summary to FILE")
    args = ap.parse_args()
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    args.mig_memory = parse_size(args.mig_memory)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    for s in args.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}: idle, light or busy")
    args.post_copy = args.post_copy or args.post_copy_only
    if args.post_copy and not any(s != "idle" for s in args.scenarios):
        ap.error("--post-copy needs a soaking scenario (light or busy): an idle guest dirties "
                 "nothing, so QEMU's pre-copy always completes before a switch")
    if args.runs < 1 or args.cpus < 1 or not 0 <= args.touch_pct <= 90:
        ap.error("--runs and --cpus must be at least 1, --touch-pct 0-90")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    qemu = shutil.which(args.qemu)
    if not qemu:
        print(f"error: {args.qemu} not found: this benchmark compares with QEMU "
              "(Debian: apt-get install -y qemu-system-x86)", file=sys.stderr)
        return 2
    args.qemu = qemu
    if not os.access(args.vessel, os.X_OK):
        print(f"error: {args.vessel} is not executable", file=sys.stderr)
        return 2
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("error: /dev/kvm is not usable", file=sys.stderr)
        return 2
    guest = os.path.abspath(args.guest)
    if not os.access(guest, os.R_OK):
        print(f"error: guest ELF {guest} not found", file=sys.stderr)
        return 2

    hc = host_check(args.vessel)
    _, vver, _ = run_text([args.vessel, "--version"], timeout=60)
    _, qver, _ = run_text([qemu, "--version"], timeout=60)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vessel-snapbench-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    st = Setup(args, workdir, guest)
    facts = {
        "cpu_model": cpu_model(), "host_cpus": os.cpu_count(), "kernel": platform.release(),
        "loadavg_start": loadavg(), "kvm_module": hc.get("kvm_module"),
        "ring0_native": hc.get("ring0_native"),
        "vessel": f"{args.vessel} ({vver.strip()})",
        "qemu": f"{qemu} ({qver.splitlines()[0] if qver else '?'})", "guest_elf": guest,
        "settings": {k: v for k, v in vars(args).items() if k not in ("vessel", "qemu")},
    }
    print("Vessel snapshot/restore and live-migration benchmark (vs QEMU -M microvm)")
    print(f"  cpu:      {facts['cpu_model']} ({facts['host_cpus']} host CPUs), "
          f"kernel {facts['kernel']}")
    print(f"  kvm:      {facts['kvm_module']}, ring0_native={facts['ring0_native']}")
    print(f"  load:     {facts['loadavg_start']} (1/5/15-min load average at start)")
    print(f"  vessel:   {facts['vessel']}")
    print(f"  qemu:     {facts['qemu']}")
    print(f"  guest:    {guest} (both VMMs, PVH)")
    print(f"  settings: {args.runs} runs, {args.cpus} vCPU(s), guest writes {args.touch_pct}% "
          f"of its RAM at boot (touch=), soakms={args.soakms}, downtime limit "
          f"{args.downtime_ms} ms, snapshots in {workdir}")
    if args.post_copy:
        print(f"  post-copy: vessel post_copy_after_rounds=1; qemu migrate-start-postcopy at "
              f"{args.qemu_switch_mib} MiB left in its first pass, downtime-limit 1 ms")
    print(flush=True)

    records = []

    def record(rec):
        records.append(rec)
        what = " ".join(str(rec[k]) for k in ("vmm", "phase", "size", "mode", "scenario", "rep")
                        if k in rec)
        if "error" in rec:
            print(f"  FAILED {what}: {rec['error']}", file=sys.stderr, flush=True)
        elif args.verbose:
            nums = ", ".join(f"{k} {v:.0f}" for k, v in rec.items()
                             if isinstance(v, (int, float)) and k != "rep")
            print(f"  {what}: {nums}", file=sys.stderr, flush=True)

    def guarded(run, what, *a):
        """run(*a), or a record of why it failed (a bug here must not lose the results)."""
        try:
            return run(*a)
        except Failure as e:
            return dict(what, error=str(e))
        except OSError as e:
            return dict(what, error=f"{type(e).__name__}: {e}")

    def note(run, what, *a):
        record(guarded(run, what, *a))

    def snapshots(run, vmm, mem):
        what = {"phase": "snapshot", "vmm": vmm, "size": size_name(mem)}
        got = guarded(run, what, st, mem, args.snapshot_runs)
        if isinstance(got, dict):
            record(got)
            return None
        keep, recs = got
        for r in recs:
            record(r)
        return keep

    t_start = time.monotonic()
    try:
        if not args.skip_restore:
            for mem in args.sizes:
                print(f"snapshot/restore {size_name(mem)}...", file=sys.stderr, flush=True)
                vsnap = snapshots(vessel_snapshots, "vessel", mem)
                qsnap = snapshots(qemu_snapshots, "qemu", mem)
                for rep in range(args.runs):
                    order = [("vessel", "lazy"), ("vessel", "eager"), ("vessel", "userfaultfd"),
                             ("qemu", "file")]
                    if rep % 2:
                        order.reverse()
                    for vmm, mode in order:
                        what = {"phase": "restore", "vmm": vmm, "size": size_name(mem),
                                "mode": mode, "rep": rep}
                        if vmm == "vessel" and vsnap:
                            note(vessel_restore, what, st, vsnap, mem, mode, rep)
                        elif vmm == "qemu" and qsnap:
                            note(qemu_restore, what, st, qsnap, mem, rep)
                for p in (vsnap, qsnap):
                    if p and os.path.isdir(p):
                        shutil.rmtree(p)
                    elif p and os.path.exists(p):
                        os.unlink(p)
        if not args.skip_migration:
            modes = ([] if args.post_copy_only else ["precopy"]) + \
                (["postcopy"] if args.post_copy else [])
            for sc, mode in [(sc, m) for sc in args.scenarios for m in modes
                             if m == "precopy" or sc != "idle"]:
                print(f"migration {sc} {mode}...", file=sys.stderr, flush=True)
                for rep in range(args.runs):
                    if mode == "precopy":
                        order = [("vessel", vessel_migrate), ("qemu", qemu_migrate)]
                    else:
                        order = [("vessel", lambda *a: vessel_migrate(*a, post_copy=True)),
                                 ("qemu", lambda *a: qemu_migrate(*a, post_copy=True))]
                    if rep % 2:
                        order.reverse()
                    for vmm, f in order:
                        what = {"phase": "migration", "vmm": vmm, "scenario": sc,
                                "mode": mode, "rep": rep}
                        note(f, what, st, sc, rep)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted ({str(e) or 'Ctrl-C'}); reporting what was measured",
              file=sys.stderr)
    except Exception:  # a bug in this script: still report what was measured
        traceback.print_exc()
        records.append({"phase": "aborted", "error": traceback.format_exc()})
    finally:
        for v in list(_CHILDREN):
            v.stop(signal.SIGKILL)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    print()
    report(records, args)
    failed = sum(1 for r in records if "error" in r)
    if failed:
        print(f"failed runs: {failed} (see stderr / --json)")
    facts["loadavg_end"] = loadavg()
    print(f"wall time {elapsed:.0f} s; load average at end {facts['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "host_check": hc, "runs": records}, f, indent=1)
        print(f"raw results written to {args.json}")
    return 0 if records and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
