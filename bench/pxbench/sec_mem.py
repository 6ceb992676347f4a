"""Section 6: the daemon's memory with 1, 100 and 1000 VDIs open under light load.

A freshly started daemon on the store of section 4 (which by then holds the template `tpl` and
its forks vm00000…). Each open VDI is one NBD connection; light load is a round robin of 4K
reads at random offsets with one write in ten, about `mem_rate` requests a second in all.
RSS is read from /proc after each step (VmRSS) together with the peak (VmHWM)."""

import random
import resource
import time

from . import nbd
from .sec_meta import ensure_forks, meta_store
from .servers import HOST
from .util import log, rss_kib


def _light_load(conns, seconds, rate, rng):
    blocks = (1 << 30) // 4096
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        c = conns[n % len(conns)]
        off = rng.randrange(blocks) * 4096
        if n % 10 == 9:
            c.write(off, rng.randbytes(4096))
        else:
            c.read(off, 4096)
        n += 1
        time.sleep(1.0 / rate)
    return n


def run(run, site, cfg):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(cfg.mem_vdis) + 64
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, 4096)), hard))
    px = site.parallax(label="parallax-mem", store=meta_store(site))
    rng = random.Random(3)
    conns = []
    with px:
        ensure_forks(px, max(cfg.mem_vdis))
        px.stop()  # measure a freshly started daemon
        px.start()
        base = rss_kib(px.pid())
        run.record("memory", fs=site.name, vdis=0, requests=0, **base)
        log(f"mem {site.name}: 0 VDIs open: RSS {base['VmRSS'] / 1024:.1f} MiB")
        try:
            for n in sorted(cfg.mem_vdis):
                while len(conns) < n:
                    conns.append(nbd.Client(HOST, px.port, f"vm{len(conns):05d}"))
                reqs = _light_load(conns, cfg.mem_seconds, cfg.mem_rate, rng)
                time.sleep(0.5)
                m = rss_kib(px.pid())
                run.record("memory", fs=site.name, vdis=n, requests=reqs, **m)
                log(f"mem {site.name}: {n} VDIs open: RSS {m['VmRSS'] / 1024:.1f} MiB (peak {m['VmHWM'] / 1024:.1f})")
        finally:
            for c in conns:
                c.close()
