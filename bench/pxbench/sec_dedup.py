"""Section 8: dedup. Every figure against its own baseline, in the same run:

* `write`: fio unique data (`--refill_buffers`), 4K random writes QD16 and 1 MiB sequential
  writes QD8, on a fresh VDI with inline dedup on and off (target ≥ 0.8×);
* `dup`: nbdcopy of a file of random data into a fresh VDI of a store that already holds that
  data (every block a duplicate) against the same copy into an empty store (target ≥ 1.0×);
* `pass`: `parallax dedup` over a store holding the data twice (imported with inline dedup
  off), in data bytes looked at per second (target ≥ 300 MB/s on tmpfs);
* `read`: 4K random reads QD16 and 1 MiB sequential reads QD8 of a VDI whose blocks the pass
  pointed at the other copy, against the same VDI in the store before the pass (≥ 0.95×);
* `forks`: 20 forks of a template each writing the same `dedup_shared` bytes (nbdcopy) and
  `dedup_own` of their own (qemu-io): how much the store grew (target ≤ shared + 20 × own +
  2 %; without dedup it would be 20 × (shared + own));
* `ram`: daemon RSS growth per unique block written, in steady state: N unique blocks at a
  time (each part's data its own: fio's buffers are seeded afresh), two parts to warm the
  caches up, then the growth over the next four (map node, refcount and index leaf caches
  held small, so that what grows is the index: target ≤ 4 B)."""

import json
import os
import shutil
import subprocess
import time

from . import fio
from .util import log, rss_kib, sh

FORKS = 20


def _store(site, name, size, inline=True):
    path = os.path.join(site.dir, name)
    if os.path.exists(path):
        os.unlink(path)
    sh([site.bin, "--store", path, "init", "--size", f"{size >> 20}M"])
    if not inline:
        sh([site.bin, "--store", path, "dedup", "set", "--inline", "off"])
    return path


def _px(site, store, label, extra=""):
    # Background dedup off: every figure here says what it measures and nothing else runs.
    return site.parallax(label=label, store=store,
                         config_extra=f"    dedup: (background: false),\n{extra}")


def _json(site, store, *args):
    out = subprocess.run([site.bin, "--store", store, *args, "--json"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def _fio(run, site, uri, name, rw, bs, depth, cfg, size, extra=()):
    out = os.path.join(run.raw_dir, f"dedup-{site.name}-{name}.json")
    return fio.nbd(uri, rw, bs, depth, 1, cfg.runtime, 0, out, size=size,
                   extra=["--refill_buffers", *extra])


def _write(run, site, cfg, rep):
    size = cfg.dedup_size
    jobs = [("4k-randwrite-qd16", "randwrite", "4k", 16), ("1m-write-qd8", "write", "1m", 8)]
    modes = [("on", True), ("off", False)]
    if rep % 2:
        modes.reverse()
    for job, rw, bs, depth in jobs:
        for mode, inline in modes:
            # Room for fio to overwrite the VDI several times between checkpoints, as in the
            # other sections (a store of 6× the data).
            store = _store(site, "dedup-w.px", 6 * size, inline)
            sh([site.bin, "--store", store, "vdi", "create", "w", "--size", str(size)])
            px = _px(site, store, f"parallax-dedup-{mode}")
            with px:
                res = _fio(run, site, px.uri("w"), f"write-{job}-{mode}-{rep}", rw, bs, depth, cfg, size)
            run.record("dedup_write", fs=site.name, job=job, inline=mode, rep=rep, **res)
            log(f"dedup {site.name} write {job:18s} inline {mode:3s}: {res['iops']:9.0f} IOPS "
                f"{res['mb_s']:8.1f} MB/s")
            os.unlink(store)


def _copy_seconds(site, store, data, name):
    """nbdcopy of `data` into a fresh VDI `name` of `store`, timed (connect to last flush)."""
    sh([site.bin, "--store", store, "vdi", "create", name, "--size", str(os.path.getsize(data))])
    px = _px(site, store, "parallax-dedup-copy")
    with px:
        t = time.perf_counter()
        sh(["nbdcopy", data, px.uri(name)])
        return time.perf_counter() - t


def _dup(run, site, cfg, data, rep):
    size = os.path.getsize(data)
    cases = ["unique", "duplicate"]
    if rep % 2:
        cases.reverse()
    for case in cases:
        store = _store(site, "dedup-d.px", 2 * size + (1 << 30))
        if case == "duplicate":
            sh([site.bin, "--store", store, "vdi", "import", "first", data])
        secs = _copy_seconds(site, store, data, "copy")
        stored = _json(site, store, "df")["stored_bytes"]
        run.record("dedup_dup", fs=site.name, case=case, rep=rep, seconds=secs,
                   mb_s=size / secs / 1e6, stored_bytes=stored)
        log(f"dedup {site.name} copy {case:9s}: {size / secs / 1e6:8.1f} MB/s (stored {stored >> 20} MiB)")
        os.unlink(store)


def _pass_and_read(run, site, cfg, data, rep):
    size = os.path.getsize(data)
    before = _store(site, "dedup-p.px", 3 * size + (1 << 30), inline=False)
    sh([site.bin, "--store", before, "vdi", "import", "a", data])
    sh([site.bin, "--store", before, "vdi", "import", "b", data])
    after = os.path.join(site.dir, "dedup-p2.px")
    shutil.copyfile(before, after)
    r = _json(site, after, "dedup")
    rate = r["blocks_scanned"] * 4096 / max(r["seconds"], 1e-9) / 1e6
    run.record("dedup_pass", fs=site.name, rep=rep, mb_s=rate, **r)
    log(f"dedup {site.name} pass: {r['blocks_scanned']} blocks in {r['seconds']:.2f}s = {rate:.0f} MB/s, "
        f"{r['blocks_shared']} shared")
    jobs = [("4k-randread-qd16", "randread", "4k", 16), ("1m-read-qd8", "read", "1m", 8)]
    stores = [("plain", before), ("deduped", after)]
    if rep % 2:
        stores.reverse()
    for job, rw, bs, depth in jobs:
        for case, store in stores:
            px = _px(site, store, f"parallax-dedup-read-{case}")
            with px:
                res = fio.nbd(px.uri("a"), rw, bs, depth, 1, cfg.runtime, 1,
                              os.path.join(run.raw_dir, f"dedup-{site.name}-read-{job}-{case}-{rep}.json"),
                              size=size)
            run.record("dedup_read", fs=site.name, job=job, case=case, rep=rep, **res)
            log(f"dedup {site.name} read {job:18s} {case:8s}: {res['iops']:9.0f} IOPS {res['mb_s']:8.1f} MB/s")
    os.unlink(before)
    os.unlink(after)


def _forks(run, site, cfg, data):
    shared_n, own_n = cfg.dedup_shared, cfg.dedup_own
    tpl_n = shared_n * 2
    tpl = os.path.join(site.dir, "dedup-template.img")
    with open(data, "rb") as src, open(tpl, "wb") as dst:
        dst.write(src.read(tpl_n))
    shared = os.path.join(site.dir, "dedup-shared.img")
    with open(shared, "wb") as f:
        f.write(os.urandom(shared_n))
    store = _store(site, "dedup-f.px", tpl_n + FORKS * (shared_n + own_n) + (2 << 30))
    sh([site.bin, "--store", store, "vdi", "import", "t", tpl])
    sh([site.bin, "--store", store, "vdi", "snapshot", "t", "base"])
    for i in range(FORKS):
        sh([site.bin, "--store", store, "vdi", "fork", "t@base", f"f{i:02d}"])
    before = _json(site, store, "df")["stored_bytes"]
    own = os.path.join(site.dir, "dedup-own.img")
    px = _px(site, store, "parallax-dedup-forks")
    t = time.perf_counter()
    with px:
        for i in range(FORKS):
            uri = px.uri(f"f{i:02d}")
            sh(["nbdcopy", shared, uri])
            with open(own, "wb") as f:
                f.write(os.urandom(own_n))
            sh(["qemu-io", "-f", "raw", uri, "-c", f"write -q -s {own} {shared_n} {own_n}", "-c", "flush"])
    secs = time.perf_counter() - t
    df = _json(site, store, "df")
    grew = df["stored_bytes"] - before
    target = (shared_n + FORKS * own_n) * 1.02
    without = FORKS * (shared_n + own_n)
    run.record("dedup_forks", fs=site.name, forks=FORKS, shared_bytes=shared_n, own_bytes=own_n,
               grew_bytes=grew, target_bytes=target, without_dedup_bytes=without, seconds=secs,
               index_entries=df["dedup"]["index_entries"], index_bytes=df["dedup"]["index_bytes"])
    log(f"dedup {site.name} {FORKS} forks: stored +{grew >> 20} MiB (target ≤ {target / 2**20:.0f} MiB, "
        f"without dedup {without >> 20} MiB) in {secs:.1f}s")
    for p in (store, tpl, shared, own):
        os.unlink(p)


RAM_WARM_PARTS = 2
RAM_PARTS = 6


def _ram(run, site, cfg):
    n = cfg.dedup_ram_blocks
    store = _store(site, "dedup-r.px", RAM_PARTS * n * 4096 + (1 << 30))
    sh([site.bin, "--store", store, "vdi", "create", "m", "--size", str(RAM_PARTS * n * 4096)])
    # The caches held small: they are bounded (16 MiB of refcount pages, 32 MiB of index
    # leaves by default), but would still be filling here, and what is measured is the index.
    px = _px(site, store, "parallax-dedup-ram",
             extra="    cache: (map_nodes: 1024, refcount_pages: 64, dedup_leaves: 1024),\n")
    points = []
    with px:
        for part in range(RAM_PARTS):
            out = os.path.join(run.raw_dir, f"dedup-{site.name}-ram-{part}.json")
            # randrepeat=0: every part's buffers from a fresh seed. With fio's fixed default
            # seed each part wrote the first part's data again, all of it duplicate.
            sh(["fio", "--name=ram", "--ioengine=nbd", f"--uri={px.uri('m')}", "--rw=write", "--bs=1m",
                "--iodepth=8", f"--offset={part * n * 4096}", f"--size={n * 4096}", "--refill_buffers",
                "--randrepeat=0", "--output-format=json", f"--output={out}"])
            px.call("flush")
            time.sleep(6)  # a checkpoint (every 5 s) puts the index changes into the tree
            points.append(rss_kib(px.pid())["VmRSS"])
        status = px.call("dedup-status")
    measured = (RAM_PARTS - RAM_WARM_PARTS) * n
    per_block = (points[-1] - points[RAM_WARM_PARTS - 1]) * 1024 / measured
    run.record("dedup_ram", fs=site.name, blocks=measured, warm_parts=RAM_WARM_PARTS, rss_kib=points,
               bytes_per_block=per_block, index_entries=status["index_entries"],
               filter_bytes=status["filter_bytes"])
    log(f"dedup {site.name} RAM: RSS by part (MiB) {' '.join(f'{p / 1024:.1f}' for p in points)}: "
        f"{per_block:.2f} B/block over the last {measured} unique blocks (index {status['index_entries']} "
        f"entries, filter {status['filter_bytes'] >> 10} KiB)")
    if status["index_entries"] != RAM_PARTS * n:
        log(f"dedup {site.name} RAM: the index holds {status['index_entries']} entries, not "
            f"{RAM_PARTS * n}: the parts' data was not all unique")
    os.unlink(store)


def run(run, site, cfg):
    data = os.path.join(site.dir, "dedup-data.raw")
    with open(site.raw, "rb") as src, open(data, "wb") as dst:
        dst.write(src.read(cfg.dedup_size))
    try:
        for rep in range(cfg.reps):
            _write(run, site, cfg, rep)
            _dup(run, site, cfg, data, rep)
            _pass_and_read(run, site, cfg, data, rep)
        _forks(run, site, cfg, data)
        _ram(run, site, cfg)
    finally:
        for name in os.listdir(site.dir):
            if name.startswith("dedup-"):
                os.unlink(os.path.join(site.dir, name))
