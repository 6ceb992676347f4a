#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/seed-*): small valid inputs of every kind, so
the fuzzers start past the first length and magic checks. Re-run after changing an input
format; the generated files are committed."""
import os, struct, shutil

HERE = os.path.dirname(os.path.abspath(__file__))

def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)

# --- NBD handshake: client flags, then options --------------------------------------------
IHAVEOPT = 0x49484156454F5054
def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data
def name_req(name, reqs=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)
def meta(name, queries):
    n = name.encode()
    b = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        b += struct.pack(">I", len(q)) + q.encode()
    return b
FLAGS = struct.pack(">I", 3)
put("nbd_handshake", "go", FLAGS + opt(8) + opt(10, meta("disk", ["base:allocation"])) + opt(7, name_req("disk", (0, 1, 2, 3))))
put("nbd_handshake", "list-info", FLAGS + opt(3) + opt(6, name_req("disk@snap", (3,))) + opt(9, meta("disk", [])) + opt(2))
put("nbd_handshake", "export-name", struct.pack(">I", 1) + opt(1, b"disk"))
# --- NBD client: what a server sends (greeting, option replies, then reply chunks) ---------
NBDMAGIC, REPLY_MAGIC, CHUNK_MAGIC = 0x4e42444d41474943, 0x0003e889045565a9, 0x668e33ef
def rep(o, t, data=b""):
    return struct.pack(">QIII", REPLY_MAGIC, o, t, len(data)) + data
def chunk(flags, kind, handle, payload):
    return struct.pack(">IHHQI", CHUNK_MAGIC, flags, kind, handle, len(payload)) + payload
SIZE = 65536
server = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
server += rep(8, 1)
server += rep(10, 4, struct.pack(">I", 1) + b"base:allocation") + rep(10, 1)
server += rep(7, 3, struct.pack(">HQH", 0, SIZE, 1)) + rep(7, 3, struct.pack(">HIII", 3, 1, 4096, 1 << 25)) + rep(7, 1)
status = chunk(1, 5, 1, struct.pack(">III", 1, 32768, 0) + struct.pack(">II", 32768, 3))
put("nbd_client", "status-then-read", server + status + chunk(1, 1, 2, struct.pack(">Q", 0) + bytes(range(256)) * 256))
put("nbd_client", "hole-and-error", server + status + chunk(0, 2, 2, struct.pack(">QI", 0, 4096)) + chunk(1, 0x8001, 2, struct.pack(">IH", 5, 3) + b"bad"))
put("nbd_client", "refused", struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3) + rep(8, 0x80000001) + rep(7, 0x80000006, b"no such export"))
put("nbd_handshake", "starttls-then-go", FLAGS + opt(8) + opt(5) + opt(5) + opt(7, name_req("disk", (3,))))
put("nbd_handshake", "unknown-then-go", FLAGS + opt(5, b"x" * 16) + opt(7, name_req("nope")) + opt(7, name_req("")))

# --- NBD requests: 28-byte headers ----------------------------------------------------------
def req(kind, flags=0, handle=1, offset=0, length=4096):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, handle, offset, length)
put("nbd_requests", "all-kinds", b"".join(req(k, f, k, 4096 * k, 4096) for k in range(8) for f in (0, 1, 4, 16)))
put("nbd_requests", "edges", req(0, 0, 1, (1 << 20) - 512, 512) + req(1, 1, 2, 1 << 20, 1) + req(6, 2, 3, 0, 0xffffffff) + req(7, 8, 4, 0, 1 << 16))

# --- blkif ring: [flags][req_prod][rsp_event] + ring entries + other pages ------------------
def seg(gref, first=0, last=7):
    return struct.pack("<IBBxx", gref, first, last)
def rw(op, rid, sector, segs):
    e = struct.pack("<BBHIQQ", op, len(segs), 0, 0, rid, sector) + b"".join(segs)
    return e.ljust(112, b"\0")
def discard(rid, sector, n, flag=0):
    return struct.pack("<BBHIQQQ", 5, flag, 0, 0, rid, sector, n).ljust(112, b"\0")
def indirect(op, rid, sector, nseg, pages):
    e = struct.pack("<BBHIQQH", 6, op, nseg, 0, rid, sector, 0)
    e = e.ljust(28, b"\0") + b"".join(struct.pack("<I", p) for p in pages)
    return e.ljust(112, b"\0")
def ring(flags, entries, pages=()):
    """Entries fill the ring (one page, or two with flags bit 0); pages[i] is data gref i."""
    body = b"".join(entries)
    body = body.ljust(4096 * (1 + (flags & 1)) - 64, b"\0") + b"".join(p.ljust(4096, b"\0") for p in pages)
    return struct.pack("<BII", flags, len(entries), 1) + body
put("blkif_ring", "rw", ring(0, [rw(1, 1, 0, [seg(2), seg(3, 1, 3)]), rw(0, 2, 0, [seg(4), seg(5)]), rw(3, 3, 0, []), rw(3, 4, 8, [seg(6)])]))
put("blkif_ring", "indirect", ring(0, [indirect(1, 10, 16, 3, [1]), indirect(0, 11, 16, 3, [1]), discard(12, 0, 64)],
                                   [b"", seg(3) + seg(4, 0, 3) + seg(5, 4, 7)]))
put("blkif_ring", "order1", ring(1, [rw(0, i, i * 8, [seg(3)]) for i in range(40)]))
put("blkif_ring", "bad", ring(0, [rw(9, 1, 0, [seg(2)]), rw(1, 2, 1 << 40, [seg(2)]), rw(0, 3, 0, [seg(99)]), discard(4, 0, 8, 1), rw(0, 4, 0, [seg(2, 5, 2)])]))

# --- store metadata: [flags] + patches [target][offset u16][len][bytes] --------------------
for t in range(0, 256, 7):
    for off, data in ((64, b"\x01\x00\x00\x00"), (0, b"\x02"), (8, b"\xff" * 6), (88, b"\x00\x10")):
        put("store_metadata", f"t{t:03}-o{off}", bytes([0, t]) + struct.pack("<HB", off, len(data)) + data)
put("store_metadata", "raw", bytes([1, 3]) + struct.pack("<HB", 100, 1) + b"\x55")
put("store_metadata", "writes", bytes([2, 5]) + struct.pack("<HB", 200, 2) + b"\x00\x00")

# --- config ---------------------------------------------------------------------------------
with open(os.path.join(HERE, "..", "parallax.ron"), "rb") as f:
    put("config", "example", f.read())
put("config", "empty", b"()")
put("config", "partial", b'(store: "/tmp/s", nbd: (listen: ["0.0.0.0:10810", "[::1]:10809"], unix: None, max_connections: 2, insecure: true), rings: (enabled: false))')
put("config", "bad", b'(nbd: (max_request_bytes: 1000, workers: 0), commit_interval_ms: 0, cache: (map_nodes: 18446744073709551615))')
