"""Section 3: read throughput against snapshot depth.

Parallax: a chain v → v@g → fork d1 (16 random 4K writes) → d1@g → fork d2 → … → d1000, so
every generation holds some data of its own; 4K random reads (QD16) on v (depth 0), d10, d100
and d1000. Peer: a qcow2 backing chain of 1 and 10 overlays on the same data, each overlay
with 16 random 4K writes of its own, against the qcow2 base itself (depth 0)."""

import os
import random
import time

from . import fio, nbd
from .sec_nbd import measure
from .servers import HOST
from .util import log, rotate, sh

WRITES_PER_GEN = 16


def _build_parallax_chain(run, site, px, depth):
    rng = random.Random(7)
    blocks = site.size // 4096
    prev = "v"
    t0 = time.monotonic()
    for i in range(1, depth + 1):
        px.call("snapshot", vdi=prev, snap="g")
        px.call("fork", src=f"{prev}@g", new=f"d{i}")
        c = nbd.Client(HOST, px.port, f"d{i}")
        for _ in range(WRITES_PER_GEN):
            c.write(rng.randrange(blocks) * 4096, bytes([i & 0xFF]) * 4096)
        c.close()
        prev = f"d{i}"
    px.call("flush")
    secs = time.monotonic() - t0
    run.record("depth-build", fs=site.name, system="parallax", depth=depth, seconds=secs)
    log(f"depth {site.name}: {depth} parallax generations in {secs:.1f}s")


def _build_qcow2_chain(site, depth):
    rng = random.Random(7)
    blocks = site.size // 4096
    prev, tops = site.qcow2, {0: site.qcow2}
    for i in range(1, depth + 1):
        top = os.path.join(site.dir, f"chain{i}.qcow2")
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", top])
        cmds = []
        for _ in range(WRITES_PER_GEN):
            cmds += ["-c", f"write -q -P {i & 0xFF} {rng.randrange(blocks) * 4096} 4k"]
        sh(["qemu-io", "-f", "qcow2", *cmds, top])
        tops[i] = top
        prev = top
    return tops


def run(run, site, cfg):
    px = site.parallax()
    qtops = _build_qcow2_chain(site, max(cfg.qcow2_depths))
    with px:
        _build_parallax_chain(run, site, px, max(cfg.depths))
        targets = [("parallax", d) for d in cfg.depths] + [("qcow2 writeback", d) for d in cfg.qcow2_depths]
        for rep in range(cfg.reps):
            for system, d in rotate(targets, rep):
                out = os.path.join(run.raw_dir, f"depth-{site.name}-{system.split()[0]}-{d}-{rep}.json")
                if system == "parallax":
                    res = measure(px, lambda: fio.nbd(px.uri("v" if d == 0 else f"d{d}"), "randread", "4k", 16,
                                                      1, cfg.runtime, 0, out, size=site.size), cfg.runtime)
                else:
                    with site.qemu(system, qtops[d], "qcow2", "writeback", read_only=True) as q:
                        res = measure(q, lambda: fio.nbd(q.uri(), "randread", "4k", 16, 1, cfg.runtime, 0, out,
                                                         size=site.size), cfg.runtime)
                run.record("depth", fs=site.name, system=system, depth=d, rep=rep, **res)
                log(f"depth {site.name} {system:16s} {d:5d} {res['iops']:9.0f} IOPS "
                    f"{res['server_cpu_us_per_op'] or 0:6.1f} CPU us/op")
    for d, top in qtops.items():
        if d:
            os.unlink(top)
