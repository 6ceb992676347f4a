"""Section 4: snapshot and fork latency against VDI size, idle and under live writes, and the
time and metadata space of many forks of one template.

Runs on a store of its own (`meta.px`), since its VDIs are big and sparse. Latency is the
wall-clock time of one request on the daemon's control socket, connect to reply, which is what
`parallax vdi snapshot` costs minus process start-up; a snapshot is durable when it returns, so
it includes a flush of the intent log (one fsync)."""

import json
import os
import random
import time

from . import fio, nbd
from .servers import HOST, ControlError
from .util import human, log, quantile, sh

SPREAD_BLOCKS = 4096


def meta_store(site):
    return os.path.join(site.dir, "meta.px")


def _spread(px, name, size, seed):
    """Writes SPREAD_BLOCKS 4K blocks spread evenly (with jitter) over the whole VDI."""
    rng = random.Random(seed)
    blocks = size // 4096
    stride = blocks // SPREAD_BLOCKS
    c = nbd.Client(HOST, px.port, name)
    for i in range(SPREAD_BLOCKS):
        c.write((i * stride + rng.randrange(stride)) * 4096, rng.randbytes(4096))
    c.flush()
    c.close()


def _stats(lat_us):
    return {"n": len(lat_us), "p50_us": quantile(lat_us, 0.5), "p99_us": quantile(lat_us, 0.99),
            "max_us": max(lat_us) if lat_us else None}


def _measure(run, site, cfg, px, name, size, live):
    """`cfg.meta_ops` snapshots of `name`, then as many forks of its first one."""
    tag = "live" if live else "idle"
    bg = None
    if live:
        out = os.path.join(run.raw_dir, f"meta-{site.name}-{name}-livewrites.json")
        bg = fio.Background(px.uri(name), "randwrite", "4k", 16, cfg.meta_ops // 5 + 30, out, size=size)
        time.sleep(1.0)
    snaps, forks = [], []
    for i in range(cfg.meta_ops):
        if bg and not bg.running():
            break
        snaps.append(px.control.timed("snapshot", vdi=name, snap=f"{tag}{i}"))
        time.sleep(0.005)
    for i in range(len(snaps)):
        if bg and not bg.running():
            break
        forks.append(px.control.timed("fork", src=f"{name}@{tag}0", new=f"{name}-{tag}-f{i}"))
        time.sleep(0.005)
    writes = None
    if bg:
        try:
            writes = bg.stop()
        except fio.FioError as e:
            run.note(f"{site.name}: background writes for {name}: {e}")
    for op, lat in (("snapshot", snaps), ("fork", forks)):
        rec = run.record("meta-latency", fs=site.name, vdi_size=size, op=op, during=tag, samples_us=lat,
                         live_write_iops=writes["iops"] if writes else None, **_stats(lat))
        log(f"meta {site.name} {human(size):>7s} {op:8s} {tag}: p50 {rec['p50_us'] or 0:8.0f} us  "
            f"p99 {rec['p99_us'] or 0:8.0f} us  (n={len(lat)})")


def ensure_store(site):
    """Creates the section's store unless an earlier section did."""
    store = meta_store(site)
    if not os.path.exists(store):
        sh([site.bin, "--store", store, "init", "--size", "8G"])
    return store


# The write rate behind the loaded floor: about what fio's live 4K writes reach through the
# daemon on this machine (the `live write IOPS` column).
FLOOR_LOAD_IOPS = 40000


def fsync_floor(run, site):
    """What one fdatasync costs on this file system (fio, 4K writes each followed by
    fdatasync): a durable snapshot or fork needs one, so this is the floor under their latency.
    Measured twice: alone, and while another job writes 4K blocks at random into the same sparse
    file at FLOOR_LOAD_IOPS (buffered, as the daemon writes): then each fdatasync also writes out
    what that job wrote since the last one, as a snapshot's does for the live writes."""
    probe = os.path.join(site.dir, "fsync.probe")
    for during in ("idle", "live"):
        out = os.path.join(run.raw_dir, f"meta-{site.name}-fdatasync-{during}.json")
        if os.path.exists(probe):
            os.unlink(probe)
        args = ["fio", f"--filename={probe}", "--bs=4k", "--time_based", "--runtime=3",
                "--output-format=json", f"--output={out}"]
        if during == "idle":
            args += ["--size=16m", "--name=fsync", "--rw=write", "--fdatasync=1"]
        else:
            with open(probe, "wb") as f:
                f.truncate(1 << 30)
            args += ["--size=1g", "--name=load", "--rw=randwrite", "--ioengine=psync",
                     f"--rate_iops={FLOOR_LOAD_IOPS}",
                     "--name=fsync", "--rw=randwrite", "--ioengine=psync", "--fdatasync=1", "--rate_iops=100"]
        sh(args)
        with open(out) as f:
            j = json.load(f)
        job = next(jb for jb in j["jobs"] if jb["jobname"] == "fsync")
        lat = job["sync"]["lat_ns"]
        pct = lat.get("percentile", {})
        rec = run.record("fsync-floor", fs=site.name, during=during, p50_us=pct.get("50.000000", 0) / 1e3,
                         p99_us=pct.get("99.000000", 0) / 1e3, max_us=lat.get("max", 0) / 1e3, n=lat.get("N"),
                         load_iops=FLOOR_LOAD_IOPS if during == "live" else 0)
        log(f"meta {site.name}: fdatasync {during}: p50 {rec['p50_us']:.0f} us, p99 {rec['p99_us']:.0f} us")
    os.unlink(probe)


def latency(run, site, cfg):
    fsync_floor(run, site)
    store = ensure_store(site)
    px = site.parallax(label="parallax-meta", store=store)
    with px:
        # The control socket's own floor: a request that does nothing (connect, a thread in the
        # daemon, one JSON line each way).
        hello = []
        for _ in range(cfg.meta_ops):
            hello.append(px.control.timed("hello"))
            time.sleep(0.005)
        rec = run.record("control-floor", fs=site.name, samples_us=hello, **_stats(hello))
        log(f"meta {site.name}: control-socket round trip p50 {rec['p50_us']:.0f} us, p99 {rec['p99_us']:.0f} us")
        for k, size in enumerate(cfg.meta_sizes):
            name = f"sz{k}"
            px.call("create", name=name, size=size)
            _spread(px, name, size, k)
            _measure(run, site, cfg, px, name, size, live=False)
            _measure(run, site, cfg, px, name, size, live=True)


def make_template(px):
    """The 1 GiB template `tpl` with data spread over it, and its snapshot `tpl@gold`."""
    px.call("create", name="tpl", size=1 << 30)
    _spread(px, "tpl", 1 << 30, 99)
    px.call("snapshot", vdi="tpl", snap="gold")
    px.call("flush")


def ensure_forks(px, n):
    """Makes sure forks vm00000 … of `tpl@gold` exist up to `n` (when section `forks` did not run)."""
    try:
        px.call("info", name=f"vm{n - 1:05d}")
        return
    except ControlError:
        pass
    try:
        px.call("info", name="tpl@gold")
    except ControlError:
        make_template(px)
    for i in range(n):
        try:
            px.call("fork", src="tpl@gold", new=f"vm{i:05d}")
        except ControlError:
            pass  # exists already
    px.call("flush")


# Longer than the daemon's default checkpoint interval (`commit_interval_ms`, 5000).
CHECKPOINT_WAIT_S = 6


def forks(run, site, cfg):
    """`cfg.forks` forks of one template snapshot: time per fork and store bytes per fork."""
    store = meta_store(site)
    px = site.parallax(label="parallax-meta", store=store)
    with px:
        make_template(px)
        # A flush makes changes durable in the intent log; blocks are counted as used once a
        # background checkpoint (every 5 s by default) writes them into the maps.
        time.sleep(CHECKPOINT_WAIT_S)
        before = px.call("df")
        lat = []
        t0 = time.monotonic()
        for i in range(cfg.forks):
            lat.append(px.control.timed("fork", src="tpl@gold", new=f"vm{i:05d}"))
        total = time.monotonic() - t0
        px.call("flush")
        time.sleep(CHECKPOINT_WAIT_S)
        after = px.call("df")
    used = after["used_bytes"] - before["used_bytes"]
    rec = run.record("fork-storm", fs=site.name, forks=cfg.forks, seconds=total, bytes_per_fork=used / cfg.forks,
                     df_before=before, df_after=after, mean_us=total * 1e6 / cfg.forks, samples_us=lat,
                     **_stats(lat))
    log(f"forks {site.name}: {cfg.forks} in {total:.1f}s, p50 {rec['p50_us']:.0f} us p99 {rec['p99_us']:.0f} us, "
        f"{rec['bytes_per_fork']:.0f} bytes/fork")


def continuous(run, site, cfg):
    """Write IOPS while the VDI is snapshotted every 10 ms, against the same run without.

    Each repetition runs on a store of its own (1000 snapshots of a busy VDI pin gigabytes of
    old blocks and map nodes), made fresh, and runs both variants in rotating order: fio 4K random
    writes at QD16 for `cfg.snap_seconds` over a 1 GiB VDI with data spread over it, with
    snapshots taken on a 10 ms schedule through the control socket (a snapshot that takes
    longer delays the next one, it is not skipped)."""
    size = 1 << 30
    period = 0.010
    for rep in range(cfg.reps):
        store = os.path.join(site.dir, f"snaps{rep}.px")
        if os.path.exists(store):
            os.unlink(store)
        # 8 GiB holds a run whose 1000 snapshots pin every block written and the map nodes
        # copied after each snapshot (a few GiB), and leaves the tmpfs site memory to spare.
        sh([site.bin, "--store", store, "init", "--size", "8G"])
        px = site.parallax(label="parallax-snaps", store=store)
        try:
            _continuous_rep(run, site, cfg, px, rep, size, period)
        finally:
            os.unlink(store)


def _auto_name(secs):
    """The name the daemon's scheduler gives a snapshot taken at Unix time `secs`."""
    return "auto-" + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs))


def _snapshot_every(px, bg, period, name):
    """Snapshots `busy` every `period` s while `bg` runs; `name(i)` names the i-th. Returns the
    latencies (us)."""
    lat = []
    time.sleep(0.2)
    t0 = time.monotonic()
    i = 0
    while bg.running():
        lat.append(px.control.timed("snapshot", vdi="busy", snap=name(i)))
        i += 1
        delay = t0 + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return lat


def _prune_while(px, bg):
    """Sets a schedule on `busy` that keeps none of its old automatic snapshots, then watches
    the daemon delete them while `bg` runs. Returns (snapshots pruned, seconds to prune all, or
    None if fio ended first)."""
    before = len(px.call("list", prefix="busy@auto-"))
    time.sleep(0.2)
    t0 = time.monotonic()
    px.call("schedule-set", target="busy",
            schedule={"every_secs": 3600, "keep": [{"every_secs": 3600, "for_secs": 3600}]})
    done = None
    left = before
    while bg.running():
        left = len(px.call("list", prefix="busy@auto-"))
        if left <= 1 and done is None:  # the new tick's snapshot stays
            done = time.monotonic() - t0
        time.sleep(0.1)
    px.call("schedule-remove", target="busy")
    return before - left, done


def _continuous_rep(run, site, cfg, px, rep, size, period):
    """One repetition of `continuous`, on the fresh store `px` serves: fio without snapshots,
    with a snapshot every 10 ms, and while a schedule prunes the ~1000 old automatic snapshots
    a fill phase left (in rotating order)."""
    modes = ["without", "with", "pruning"]
    modes = modes[rep % 3:] + modes[:rep % 3]
    with px:
        px.call("create", name="busy", size=size)
        _spread(px, "busy", size, 7 + rep)
        for mode in modes:
            out = os.path.join(run.raw_dir, f"snaps-{site.name}-{rep}-{mode}.json")
            lat, extra = [], {}
            if mode == "pruning":
                # Fill (not measured): snapshots every 10 ms under writes, named as a
                # scheduler names them, ten days ago, so that no keep rule keeps them.
                fill = fio.Background(px.uri("busy"), "randwrite", "4k", 16, cfg.snap_seconds,
                                      out + ".fill", size=size)
                old = int(time.time()) - 10 * 86400
                _snapshot_every(px, fill, period, lambda i: _auto_name(old + i))
                fill.finish()
            bg = fio.Background(px.uri("busy"), "randwrite", "4k", 16, cfg.snap_seconds, out, size=size)
            if mode == "with":
                lat = _snapshot_every(px, bg, period, lambda i: f"r{rep}-{i}")
            elif mode == "pruning":
                pruned, secs = _prune_while(px, bg)
                extra = {"pruned": pruned, "prune_seconds": secs}
            try:
                w = bg.finish()
            except fio.FioError as e:
                run.note(f"{site.name}: continuous snapshots, rep {rep} {mode}: {e}")
                continue
            rec = run.record("snaps", fs=site.name, rep=rep, mode=mode, iops=w["iops"], samples_us=lat,
                             snapshots_per_s=len(lat) / cfg.snap_seconds, **_stats(lat), **extra)
            log(f"snaps {site.name} rep {rep} {mode:7s}: {w['iops']:8.0f} IOPS"
                + (f", {len(lat)} snapshots, p50 {rec['p50_us']:.0f} us p99 {rec['p99_us']:.0f} us"
                   if lat else "")
                + (f", {extra['pruned']} snapshots pruned in "
                   + (f"{extra['prune_seconds']:.1f} s" if extra["prune_seconds"] is not None else
                      "more than the run")
                   if extra else ""))
