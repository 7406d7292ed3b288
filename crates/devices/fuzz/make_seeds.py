#!/usr/bin/env python3
"""Seed inputs for the net_queues, vsock and balloon fuzz targets: well-formed queues with a
few valid requests (a vsock REQUEST/RW/CREDIT_REQUEST/SHUTDOWN with a script that accepts,
writes, closes and connects; net transmit, control and receive chains; balloon inflate,
deflate, statistics and reporting chains), so that fuzzing starts past the magic values.
Writes corpus/<target>/seed1 (run from this directory; see each target's input layout)."""
import struct, os
def desc(addr, ln, flags=0, nxt=0): return struct.pack('<QIHH', addr, ln, flags, nxt)
W=2; NEXT=1
class Mem:
    def __init__(s, n=0x10000): s.b=bytearray(n)
    def put(s, at, data): s.b[at:at+len(data)]=data
    def queue(s, desc_at, avail_at, chains, slot0=0):
        # chains: list of list of (addr,len,flags); descriptors allocated consecutively
        i=0; heads=[]
        for ch in chains:
            heads.append(i)
            for k,(a,l,f) in enumerate(ch):
                nxt = i+1 if k+1 < len(ch) else 0
                fl = f | (NEXT if k+1 < len(ch) else 0)
                s.put(desc_at+16*i, desc(a,l,fl,nxt)); i+=1
        s.put(avail_at, struct.pack('<HH', 0, len(heads)))
        for j,h in enumerate(heads): s.put(avail_at+4+2*j, struct.pack('<H', h))
    def bytes(s, upto): return bytes(s.b[:upto])
def offs(d,a,u): return struct.pack('<HHH', d,a,u)

# ---- vsock
def vhdr(op, dport, sport=5000, ln=0, flags=0):
    return struct.pack('<QQIIIHHIII', 3, 2, sport, dport, ln, 1, op, flags, 65536, 0)
m=Mem()
m.put(0x2000, vhdr(1, 1024)); m.put(0x2100, vhdr(5, 1024, ln=5)+b'hello'); m.put(0x2200, vhdr(7,1024)); m.put(0x2300, vhdr(4,1024,flags=3))
m.queue(0x1000, 0x1200, [[(0x2000,44,0)],[(0x2100,49,0)],[(0x2200,44,0)],[(0x2300,44,0)]])
m.queue(0x0000, 0x0200, [[(0x3000+i*0x400, 0x400, W)] for i in range(8)])
script=[(0,0,0,0),(3,0,10,0),(2,0,0,0),(1,0,0,0),(4,0,20,0),(2,0,0,0),(1,0,0,0),(5,0,0,0),(2,0,0,0),(1,0,0,0),(6,0x88,0x13,0),(2,0,0,0),(1,0,0,0),(7,5,0,0),(1,0,0,0)]
sc=b''.join(bytes(r) for r in script)
data=bytes([4])+offs(0,0x200,0x400)+offs(0x1000,0x1200,0x1400)+bytes([len(script)])+sc+m.bytes(0x4000)
os.makedirs('corpus/vsock',exist_ok=True); open('corpus/vsock/seed1','wb').write(data)

# ---- net
m=Mem()
m.put(0x2000, bytes(12)); m.put(0x2100, bytes(range(60)))
m.queue(0x0000,0x0200,[[(0x2000,12,0),(0x2100,60,0)],[(0x2000,12,0)],[(0x2000,72,W)]])
m.put(0x2200, bytes([4,0,2,0])); m.put(0x2280, bytes([0,1,1]))
m.queue(0x1000,0x1200,[[(0x2200,4,0),(0x2300,1,W)],[(0x2280,3,0),(0x2301,1,W)]])
m.queue(0x1800,0x1a00,[[(0x3000+i*0x400,0x400,W)] for i in range(6)])
hdr=bytes([4,3])+offs(0,0x200,0x400)+offs(0x1000,0x1200,0x1400)+offs(0x1800,0x1a00,0x1c00)+struct.pack('<HHHH',100,2000,30,60)
os.makedirs('corpus/net_queues',exist_ok=True); open('corpus/net_queues/seed1','wb').write(hdr+m.bytes(0x4000))

# ---- balloon
m=Mem()
m.put(0x8000, struct.pack('<IIII',3,4,5,9))
m.put(0x8100, b''.join(struct.pack('<HQ',t,v) for t,v in [(0,1),(4,1<<20),(77,5)]))
m.queue(0x0000,0x0200,[[(0x8000,16,0)]])
m.queue(0x0800,0x0a00,[[(0x8000,8,0)]])
m.queue(0x1000,0x1200,[[(0x8100,30,0)],[(0x8100,20,0)]])
m.queue(0x1800,0x1a00,[[(0x9000,0x2000,W)]])
script=[(0,0,0,0),(1,0,0,0),(2,0,0,0),(3,0,0,0),(4,0,0,0),(5,4,1,3),(6,0,8,0),(7,0x10,0,0),(8,1,0x1,5)]
sc=b''.join(bytes(r) for r in script)
data=bytes([4,0])+offs(0,0x200,0x400)+offs(0x800,0xa00,0xc00)+offs(0x1000,0x1200,0x1400)+offs(0x1800,0x1a00,0x1c00)+bytes([len(script)])+sc+m.bytes(0xa000)
os.makedirs('corpus/balloon',exist_ok=True); open('corpus/balloon/seed1','wb').write(data)
