#!/usr/bin/env python3
"""Seed inputs for the fuzz targets whose inputs are queues in guest memory and register or
port scripts: well-formed queues with a few valid requests (a vsock REQUEST/RW/CREDIT_REQUEST/
SHUTDOWN with a script that accepts, writes, closes and connects; net transmit, control and
receive chains; balloon inflate, deflate, statistics and reporting chains; virtio-blk reads,
writes, flushes, IDs, discards; console transmit and receive chains and an rng chain), a
driver's initialization through virtio-mmio and virtio-pci registers, BAR sizing and
relocation through both PCI configuration mechanisms, the legacy ports' usual accesses, and
one well-formed body per API request, so that fuzzing starts past the magic values.
Writes corpus/<target>/seed* (run from this directory, or `scripts/fuzz seeds`; see each
target's input layout). The snapshot, migration and qcow2 seeds come from seeds/ (real types)."""
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

def save(target, name, data):
    os.makedirs('corpus/'+target, exist_ok=True); open('corpus/%s/%s' % (target, name), 'wb').write(data)

# ---- virtio-blk requests (block_request, mmio_transport, virtio_pci, pci_config memory)
def blk_hdr(t, sector=0): return struct.pack('<IIQ', t, 0, sector)
m=Mem()
m.put(0x2000, blk_hdr(0, 0)); m.put(0x2010, blk_hdr(1, 1)); m.put(0x2020, blk_hdr(4)); m.put(0x2030, blk_hdr(8))
m.put(0x2040, blk_hdr(11)); m.put(0x2050, struct.pack('<QII', 2, 8, 0))
m.put(0x2060, blk_hdr(13)); m.put(0x2070, struct.pack('<QII', 4, 4, 1))
m.queue(0x0000, 0x0200, [
    [(0x2000,16,0),(0x3000,512,W),(0x3f00,1,W)],
    [(0x2010,16,0),(0x3200,512,0),(0x3f01,1,W)],
    [(0x2020,16,0),(0x3f02,1,W)],
    [(0x2030,16,0),(0x3400,20,W),(0x3f03,1,W)],
    [(0x2040,16,0),(0x2050,16,0),(0x3f04,1,W)],
    [(0x2060,16,0),(0x2070,16,0),(0x3f05,1,W)],
])
blk_mem = m.bytes(0x4000)
save('block_request', 'seed1', bytes([4, 0]) + offs(0, 0x200, 0x400) + blk_mem)

# ---- virtio-mmio: a driver's initialization of queue 0, then a notification
def mmio(op, reg, v): return bytes([op, reg // 4]) + struct.pack('<I', v)
s_mmio = [mmio(1,0x00,0), mmio(1,0x04,0), mmio(1,0x08,0), mmio(0,0x70,0), mmio(0,0x70,1), mmio(0,0x70,3),
          mmio(0,0x14,1), mmio(1,0x10,0), mmio(0,0x24,1), mmio(0,0x20,1), mmio(0,0x24,0), mmio(0,0x20,0),
          mmio(0,0x70,11), mmio(1,0x70,0), mmio(0,0x30,0), mmio(1,0x34,0), mmio(0,0x38,16),
          mmio(0,0x80,0), mmio(0,0x84,0), mmio(0,0x90,0x200), mmio(0,0x94,0), mmio(0,0xa0,0x400),
          mmio(0,0xa4,0), mmio(0,0x44,1), mmio(0,0x70,15), mmio(0,0x50,0), mmio(1,0x60,0),
          mmio(0,0x64,1), mmio(1,0xfc,0), mmio(1,0x100,0)]
sc=b''.join(s_mmio)
save('mmio_transport', 'seed1', struct.pack('<H', len(sc)) + sc + blk_mem)

# ---- virtio-pci: the same through the common configuration, with MSI-X vectors
def vp(op, region, width, off, v): return bytes([op, (width << 6) | region]) + struct.pack('<HI', off, v)
B, H, L = 0, 1, 2   # widths 1, 2, 4
s_pci = [vp(0,0,B,0x14,0), vp(0,0,B,0x14,1), vp(0,0,B,0x14,3), vp(0,0,L,0x00,1), vp(2,0,L,0x04,0),
         vp(0,0,L,0x08,1), vp(0,0,L,0x0c,1), vp(0,0,L,0x08,0), vp(0,0,L,0x0c,0), vp(0,0,B,0x14,11),
         vp(0,0,H,0x10,0), vp(0,0,H,0x16,0), vp(2,0,H,0x18,0), vp(0,0,H,0x18,16), vp(0,0,H,0x1a,1),
         vp(0,0,L,0x20,0), vp(0,0,L,0x24,0), vp(0,0,L,0x28,0x200), vp(0,0,L,0x2c,0),
         vp(0,0,L,0x30,0x400), vp(0,0,L,0x34,0), vp(0,0,H,0x1c,1),
         vp(0,4,L,0x00,0xfee00000), vp(0,4,L,0x04,0), vp(0,4,L,0x08,0x41), vp(0,4,L,0x0c,0),
         vp(0,4,L,0x10,0xfee00000), vp(0,4,L,0x18,0x42), vp(0,4,L,0x1c,0),
         vp(5,0,L,0x40,0), vp(5,0,L,0x88,0), vp(4,0,H,0x8a,0x8000),
         vp(0,0,B,0x14,15), vp(0,3,H,0,0), vp(2,1,B,0,0), vp(2,5,L,0,0), vp(2,2,L,0,0),
         vp(9,0,0,1,0), vp(2,0,B,0x14,0), vp(9,0,0,0,0)]
sc=b''.join(s_pci)
save('virtio_pci', 'seed1', struct.pack('<H', len(sc)) + sc + blk_mem)

# ---- PCI configuration: IDs, BAR sizing and relocation on each function, decoding, the window
def pc(op, a, b, c, v=0): return bytes([op, a, b, c]) + struct.pack('<I', v)
s_cfg = []
for slot in range(4):
    s_cfg += [pc(0, slot, 0x00, 0), pc(1, 0x80, 0, 0), pc(0, slot, 0x0c, 0), pc(1, 0x80, 0, 0),
              pc(0, slot, 0x34, 0), pc(1, 0x00, 0, 0)]
for slot, bar, addr in [(1, 0x10, 0xe0001000), (1, 0x18, 0xe0100000), (2, 0x10, 0xe0200000), (3, 0x14, 0xe0000010), (3, 0x20, 0xe0004000)]:
    s_cfg += [pc(0, slot, 0x04, 0), pc(2, 0x40, 0, 0, 0),                  # memory decode off
              pc(0, slot, bar, 0), pc(2, 0x80, 0, 0, 0xffffffff), pc(1, 0x80, 0, 0),
              pc(2, 0x80, 0, 0, addr),
              pc(0, slot, bar + 4, 0), pc(2, 0x80, 0, 0, 0),
              pc(0, slot, 0x04, 0), pc(2, 0x40, 0, 0, 6)]                   # decode on
s_cfg += [pc(7, 0x80, 0, 0, 0x1000), pc(8, 0x80, 1, 2, 0x1004), pc(7, 0xc0, 0, 0, 0x100000),
          pc(7, 0x80, 0, 0, 0x200014), pc(7, 0x40, 0, 0, 0x200012), pc(5, 0x80, 2, 0x10), pc(6, 0x80, 3, 0x3c, 5),
          pc(5, 0x80, 0, 0x80, 0x10010), pc(9, 0, 0, 0), pc(4, 0x80, 0, 0)]
sc=b''.join(s_cfg)
save('pci_config', 'seed1', struct.pack('<H', len(sc)) + sc + blk_mem)

# ---- legacy ports: device index i, register r
def lp(op, dev, reg, v=0, width=0): return bytes([op, dev, reg, width]) + struct.pack('<I', v)
s_leg = [lp(0,0,3,0x80), lp(0,0,0,1), lp(0,0,1,0), lp(0,0,3,3), lp(0,0,1,0x0f), lp(0,0,4,0x0b),
         lp(0,0,0,0x41), lp(2,0,5), lp(2,0,2), lp(4,0,0,0x0441), lp(2,0,5), lp(2,0,0), lp(2,0,0),
         lp(2,0,6), lp(0,0,7,0x5a), lp(2,0,7), lp(0,0,4,0x10), lp(0,0,0,0x42), lp(2,0,0),
         lp(0,2,0,0x0a), lp(2,2,1), lp(0,2,0,0x0b), lp(0,2,1,0x02), lp(0,2,0,0x00), lp(2,2,1),
         lp(0,2,0,0x04), lp(2,2,1), lp(0,2,0,0x32), lp(2,2,1), lp(0,2,0,0x8f), lp(2,2,1,0,1),
         lp(2,3,1), lp(5,3,0,1), lp(2,3,3), lp(0,3,0,0x20|(5<<2)), lp(0,3,2,0xf),
         lp(0,1,4,0xfe), lp(2,1,0), lp(0,4,0,3), lp(0,5,0,123), lp(0,5,0,123)]
save('legacy_ports', 'seed1', b''.join(s_leg))

# ---- console and rng: receive, transmit and rng queues
m=Mem()
m.put(0x2000, b'hello, console\n')
m.queue(0x0000,0x0200,[[(0x3000+i*0x100,0x100,W)] for i in range(4)])
m.queue(0x1000,0x1200,[[(0x2000,6,0),(0x2006,9,0)],[(0x2000,15,0)]])
m.queue(0x1800,0x1a00,[[(0x3800,64,W)],[(0x3900,16,W),(0x3910,16,W)]])
script=[(2,4,ord('x'),0),(0,0,0,0),(1,0,0,0),(3,8,ord('!'),1),(4,0,0,8),(4,4,0,4),(2,1,ord('y'),0),(5,0,1,2),(0,0,0,0),(1,0,0,0)]
sc=b''.join(bytes(r) for r in script)
data=bytes([4,0])+offs(0,0x200,0x400)+offs(0x1000,0x1200,0x1400)+offs(0x1800,0x1a00,0x1c00)+bytes([len(script)])+sc+m.bytes(0x4000)
save('console_rng', 'seed1', data)

# ---- API requests: route index (Endpoint::ALL order), then a well-formed body
routes = ['ping','openapi.json','vm.boot','vm.info','vm.pause','vm.resume','vm.shutdown','vm.reset',
          'vm.snapshot','vm.restore','vm.migrate-send','vm.migrate-receive','vm.migration-status',
          'vm.migrate-cancel','vm.balloon','vm.balloon-set','vm.counters']
bodies = {
    'vm.pause': b'{}', 'vm.resume': b'', 'vm.shutdown': b' ', 'vm.reset': b'{}', 'vm.migrate-cancel': b'{}',
    'vm.snapshot': b'{"dir":"/tmp/snap","diff":true,"disk_snapshot":false}',
    'vm.restore': b'{"dir":"/tmp/snap","memory":"userfaultfd"}',
    'vm.migrate-send': b'{"to":"tcp:127.0.0.1:4444","downtime_ms":100,"bandwidth_mbps":1000,"post_copy":true,"post_copy_after_rounds":2,"full_digest":true}',
    'vm.migrate-receive': b'{"listen":"unix:/tmp/m.sock"}',
    'vm.balloon-set': b'{"target_bytes":1048576}',
    'vm.boot': b'{"spec":{"cpus":1,"memory":"64M","disks":[{}]},"bindings":{"disks":["/d.raw"]}}',
}
for i, r in enumerate(routes):
    save('api_requests', 'seed-' + r, bytes([i]) + bodies.get(r, b''))
save('api_requests', 'seed-wrong-method', bytes([0x80 | routes.index('vm.balloon-set')]) + b'{"target_bytes":1}')
save('api_requests', 'seed-receive-nets', bytes([routes.index('vm.migrate-receive')]) + b'{"listen":"unix:/tmp/m.sock","nets":[{"tap":"t0"},{"socket":"/run/p.sock"}]}')
save('api_requests', 'seed-boot-stream', bytes([routes.index('vm.boot')]) + b'{"spec":{"nets":[{},{}]},"bindings":{"nets":[{"socket":"/run/p.sock"},{"passt":{"forwards":[{"protocol":"tcp","host":8080,"guest":80}]}}]}}')

# ---- stream socket framing (net_stream): selector 0 reader, 1 writer, 2 backend
def frame(n, seed): return bytes((i * 13 + seed) & 0xff for i in range(n))
def wire(f): return struct.pack('>I', len(f)) + f
stream = wire(frame(60, 1)) + wire(frame(1514, 2)) + wire(frame(1, 3))
save('net_stream', 'seed-reader', bytes([0]) + bytes([1, 3, 200, 7] * ((len(stream) + 2) // 12)) + stream)
save('net_stream', 'seed-reader-bad', bytes([0]) + bytes([50, 50]) + wire(frame(60, 1)) + struct.pack('>I', 0) + b'xxxx')
save('net_stream', 'seed-writer', bytes([1]) + struct.pack('<HHH', 59, 1513, 0) + bytes([0, 1, 0, 255, 3, 0, 0, 77]))
save('net_stream', 'seed-backend', bytes([2]) + stream + struct.pack('>I', 0xffffffff))
