"""Section 7: the registry at scale — a million VDIs and forks, 100,000 snapshots of one VDI.

A store of its own (`scale.px`) is filled by the `scale` driver (`backend/examples/scale.rs`),
which uses the store library directly: a control-socket request per entry would take hours at a
million. At each stage (10k, 100k, 1M entries: 90 % forks of one template snapshot, 10 %
snapshots of one VDI) it times a sample of each operation — create, fork, snapshot, delete,
stat, info, opening a VDI as an export does, subtree, `list --prefix` — and the store's growth
per fork. Then the real daemon (`parallax serve`) opens the full store: its RSS, and the time of
`parallax vdi list` (first line and total) and `vdi list --prefix` through it.

Anchors the summary quotes: dm-thin's 24-bit device ids and 16 GiB metadata cap, RBD's clone
depth of 16, ZFS `zfs list` taking 9.5 min at 118k snapshots."""

import json
import os
import subprocess
import time

from .util import human, log, rss_kib


def _driver(site):
    return os.path.join(os.path.dirname(site.bin), "examples", "scale")


def _timed_cli(site, store, args):
    """Runs `parallax --store STORE ARGS`; returns (seconds to the first line, seconds in all,
    lines)."""
    t0 = time.monotonic()
    p = subprocess.Popen([site.bin, "--store", store, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    first, lines = None, 0
    for _ in p.stdout:
        if first is None:
            first = time.monotonic() - t0
        lines += 1
    err = p.stderr.read().decode(errors="replace")
    if p.wait() != 0:
        raise RuntimeError(f"parallax {' '.join(args)} failed: {err.strip()}")
    return first or 0.0, time.monotonic() - t0, lines


def run(run, site, cfg):
    driver = _driver(site)
    if not os.access(driver, os.X_OK):
        raise RuntimeError(f"{driver} is missing: cargo build --release --example scale")
    store = os.path.join(site.dir, "scale.px")
    if os.path.exists(store):
        os.unlink(store)
    stages = sorted(cfg.scale_stages)
    log(f"scale {site.name}: populating {','.join(map(str, stages))} entries")
    out = subprocess.run([driver, "--store", store, "--stages", ",".join(map(str, stages)),
                          "--samples", str(cfg.scale_samples)],
                         capture_output=True, text=True, check=True)
    with open(os.path.join(run.raw_dir, f"scale-{site.name}.jsonl"), "w") as f:
        f.write(out.stdout)
    for line in out.stdout.splitlines():
        st = json.loads(line)
        ops = st.pop("ops")
        st["store_file_bytes"] = os.stat(store).st_blocks * 512
        run.record("scale-store", fs=site.name, **st)
        for op, s in ops.items():
            # `list_all` says how many entries it listed; the record's `entries` is the stage.
            if "entries" in s:
                s["listed"] = s.pop("entries")
            run.record("scale-op", fs=site.name, entries=st["entries"], op=op, **s)
        log(f"scale {site.name}: {st['entries']} entries: fork p50 {ops['fork']['p50_us']:.0f} us, "
            f"p99 {ops['fork']['p99_us']:.0f} us; {st['meta_bytes_per_fork']:.0f} bytes/fork")
    entries = stages[-1]
    px = site.parallax(label="parallax-scale", store=store)
    with px:
        t_open = time.monotonic()
        rss0 = rss_kib(px.pid())
        lists = {}
        for label, args in (("list", ["vdi", "list"]),
                            ("list --prefix", ["vdi", "list", "--prefix", "vm-0000012"]),
                            ("list --prefix deep@", ["vdi", "list", "--prefix", "deep@"]),
                            ("list --json", ["vdi", "list", "--json"])):
            first, total, lines = _timed_cli(site, store, args)
            lists[label] = (first, total, lines)
            run.record("scale-list", fs=site.name, entries=entries, command=label, first_line_s=first,
                       total_s=total, lines=lines)
            log(f"scale {site.name}: `vdi {' '.join(args[1:])}` through the daemon: first line "
                f"{first * 1000:.0f} ms, {lines} lines in {total:.1f} s")
        rss = rss_kib(px.pid())
        run.record("scale-daemon", fs=site.name, entries=entries, rss_start=rss0, rss_after_lists=rss,
                   seconds_since_start=time.monotonic() - t_open)
        log(f"scale {site.name}: daemon RSS {rss0['VmRSS'] / 1024:.0f} MiB at start, "
            f"{rss['VmRSS'] / 1024:.0f} MiB after the lists (peak {rss['VmHWM'] / 1024:.0f})")
    log(f"scale {site.name}: store file {human(os.stat(store).st_blocks * 512)}")
    os.unlink(store)
