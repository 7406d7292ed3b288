#!/usr/bin/env python3
"""The host-side UDP peer of the bundled guest's network benchmark (`bench=net`).

Binds ADDR:PORT (default 10.0.2.2:7777) and serves the protocol of
guests/src/virtio/netbench.rs; the first payload byte says what a datagram is:

  D...                 count it (datagrams and bytes since the last reset), no answer
  E...                 send it back unchanged
  C reset              zero the counters; answer "C ok"
  C stat               answer "C stat <datagrams> <bytes>"
  C flood <ms> <size>  send <size>-byte "F..." datagrams to the sender as fast as possible
                       for <ms> ms, then "C done <sent> <ns>" three times, 20 ms apart

Prints "peer-ready ADDR:PORT" once it listens, and one line per control request
on stderr with --verbose. Standard library only; run it inside the benchmark's
network namespace.
"""

import argparse
import socket
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bind", default="10.0.2.2:7777", help="ADDR:PORT to listen on")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    host, _, port = args.bind.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
        try:
            # SO_RCVBUFFORCE (33) / SO_SNDBUFFORCE (32): past rmem_max/wmem_max, as root.
            sock.setsockopt(socket.SOL_SOCKET, force, 8 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
    sock.bind((host, int(port)))
    print(f"peer-ready {args.bind}", flush=True)

    buf = bytearray(65536)
    view = memoryview(buf)
    datagrams = nbytes = 0
    recv_into = sock.recvfrom_into
    send = sock.sendto
    while True:
        n, addr = recv_into(buf)
        kind = buf[0] if n else 0
        if kind == 0x44:  # 'D'
            datagrams += 1
            nbytes += n
        elif kind == 0x45:  # 'E'
            send(view[:n], addr)
        elif kind == 0x43:  # 'C'
            words = bytes(view[:n]).split()
            if args.verbose:
                print(f"peer: {b' '.join(words).decode(errors='replace')} from {addr} "
                      f"(counted {datagrams})", file=sys.stderr, flush=True)
            if words[1:2] == [b"reset"]:
                datagrams = nbytes = 0
                send(b"C ok", addr)
            elif words[1:2] == [b"stat"]:
                send(b"C stat %d %d" % (datagrams, nbytes), addr)
            elif words[1:2] == [b"flood"] and len(words) == 4:
                ms, size = int(words[2]), max(1, min(int(words[3]), 1472))
                payload = b"F" + b"." * (size - 1)
                sent = 0
                t0 = time.perf_counter_ns()
                end = t0 + ms * 1_000_000
                now = t0
                while now < end:
                    for _ in range(64):
                        try:
                            send(payload, addr)
                            sent += 1
                        except OSError:  # ENOBUFS: the tap's queue is full
                            pass
                    now = time.perf_counter_ns()
                took = now - t0
                for _ in range(3):
                    send(b"C done %d %d" % (sent, took), addr)
                    time.sleep(0.02)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
