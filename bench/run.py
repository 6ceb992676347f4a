#!/usr/bin/env python3
"""`make bench` / `make bench-quick`: Parallax against qemu-nbd, nbdkit and nbd-server.

Usage: bench/run.py [--quick] [--sections nbd,cow,depth,ring,meta,snaps,forks,mem,scale,dedup,cluster]
                    [--fs tmpfs,disk]
                    [--size 2G] [--reps 3] [--runtime S] [--out DIR] [--keep]
       bench/run.py --report DIR     (remake DIR/summary.md and the plots from DIR/results.json)

Writes bench/results/<date>/ (results.json with every raw record, raw/ with fio's and
frontend-shim's own JSON, summary.md, plots) and bench/results/LATEST.md. See bench/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from pxbench import report, sec_cluster, sec_cow, sec_dedup, sec_depth, sec_mem, sec_meta, sec_nbd, sec_ring, sec_scale  # noqa: E402
from pxbench.fio import NBD_WORKLOADS  # noqa: E402
from pxbench.sec_ring import RING_WORKLOADS  # noqa: E402
from pxbench.site import Site  # noqa: E402
from pxbench.util import Run, fs_type, log, parse_size  # noqa: E402

SECTIONS = ["nbd", "cow", "depth", "ring", "meta", "snaps", "forks", "mem", "scale", "dedup", "cluster"]

FULL = dict(
    size="2G", reps=3, runtime=4, cow_runtime=4, cow_ramp=2, fs=["tmpfs", "disk"], peers=None,
    nbd_workloads=[w[0] for w in NBD_WORKLOADS], ring_workloads=[w[0] for w in RING_WORKLOADS],
    depths=[0, 10, 100, 1000], qcow2_depths=[0, 1, 10],
    meta_sizes=["1G", "64G", "1T"], meta_ops=100, snap_seconds=10, forks=10000,
    mem_vdis=[1, 100, 1000], mem_seconds=5, mem_rate=500,
    scale_stages=[10_000, 100_000, 1_000_000], scale_samples=200,
    dedup_size=1 << 30, dedup_shared=256 << 20, dedup_own=16 << 20, dedup_ram_blocks=262144,
    # cluster: memstore keeps the OSD's data in RAM, capped at 512 MiB by scripts/cluster.sh
    cluster_vdi=1 << 30, cluster_data=128 << 20, cluster_cache=1 << 30, cluster_ttl=2, cluster_forks=50,
)
QUICK = dict(
    FULL, size="512M", reps=1, runtime=1, cow_runtime=1, cow_ramp=1, fs=["tmpfs"],
    peers=["parallax", "qemu-nbd raw writeback", "qemu-nbd qcow2 writeback", "nbdkit file", "nbd-server"],
    nbd_workloads=["4k-randread-qd16", "4k-randwrite-qd16", "1m-read-qd8"],
    ring_workloads=["4k-randread-2xqd32"], depths=[0, 100], qcow2_depths=[0, 10],
    meta_sizes=["1G", "1T"], meta_ops=20, snap_seconds=3, forks=500, mem_vdis=[1, 100], mem_seconds=2,
    scale_stages=[10_000], scale_samples=50,
    dedup_size=256 << 20, dedup_shared=32 << 20, dedup_own=2 << 20, dedup_ram_blocks=65536,
    cluster_data=64 << 20, cluster_forks=20,
)


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def machine():
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    vers = {}
    for tool, args in (("fio", ["fio", "--version"]), ("qemu-nbd", ["qemu-nbd", "--version"]),
                       ("nbdkit", ["nbdkit", "--version"]), ("nbd-server", ["nbd-server", "-V"])):
        try:
            r = subprocess.run(args, capture_output=True, text=True)
            vers[tool] = (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            vers[tool] = "missing"
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_bytes": mem, "kernel": platform.release(), "tools": vers}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the one-minute subset (tmpfs, small, 1 rep)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--fs", help="comma-separated: tmpfs, disk")
    ap.add_argument("--size", help="size of the data VDI and files (default 2G, quick 512M)")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (medians are reported)")
    ap.add_argument("--runtime", type=int, help="seconds per fio run")
    ap.add_argument("--forks", type=int, help="forks in the fork-storm measurement")
    ap.add_argument("--out", help="output directory (default bench/results/<date>[-quick])")
    ap.add_argument("--keep", action="store_true", help="keep the work directories (stores, files)")
    ap.add_argument("--tmpfs-dir", default=os.environ.get("PX_BENCH_TMPFS", "/dev/shm"))
    ap.add_argument("--disk-dir", default=os.environ.get("PX_BENCH_DISK", "/var/tmp"))
    ap.add_argument("--bin-dir", default=os.environ.get("PX_BENCH_BIN"),
                    help="where parallax and frontend-shim are (default $CARGO_TARGET_DIR/release)")
    ap.add_argument("--report", metavar="DIR", help="only remake DIR/summary.md and plots from DIR/results.json")
    a = ap.parse_args()
    if a.report:
        report.write(types.SimpleNamespace(out=os.path.abspath(a.report)))
        return

    c = dict(QUICK if a.quick else FULL)
    for k in ("size", "reps", "runtime", "forks"):
        if getattr(a, k) is not None:
            c[k] = getattr(a, k)
    if a.fs:
        c["fs"] = a.fs.split(",")
    c["sections"] = [s for s in a.sections.split(",") if s]
    bad = [s for s in c["sections"] if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections: {bad}")
    cfg = types.SimpleNamespace(**c)
    cfg.size = parse_size(cfg.size)
    cfg.meta_sizes = [parse_size(s) for s in cfg.meta_sizes]
    cfg.quick = a.quick

    bin_dir = a.bin_dir or os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target")), "release")
    px_bin, cfg.shim_bin = os.path.join(bin_dir, "parallax"), os.path.join(bin_dir, "frontend-shim")
    for b in (px_bin, cfg.shim_bin):
        if not os.access(b, os.X_OK):
            sys.exit(f"bench: {b} is missing; build with `cargo build --release` (or set PX_BENCH_BIN)")
    for tool in ("fio", "qemu-nbd", "qemu-img", "qemu-io", "nbdkit", "nbd-server", "gnuplot"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing; run scripts/deps.sh bench")

    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = a.out or os.path.join(HERE, "results", stamp + ("-quick" if a.quick else ""))
    settings = {k: v for k, v in vars(cfg).items()}
    settings.update(date=stamp, git=git_rev(), machine=machine(), parallax_bin=px_bin)
    run = Run(out, settings)
    log(f"bench: writing {out}; sections {','.join(cfg.sections)} on {','.join(cfg.fs)}")

    roots = {"tmpfs": a.tmpfs_dir, "disk": a.disk_dir}
    for name in cfg.fs:
        t = fs_type(roots[name])
        if (name == "tmpfs") != (t == "tmpfs"):
            sys.exit(f"bench: {roots[name]} is {t}, not what `{name}` means; set --{name}-dir")
    sites, source = [], None
    try:
        for name in cfg.fs:
            site = Site(run, name, roots[name], cfg.size, px_bin)
            sites.append(site)
            run.settings.setdefault("sites", []).append(site.describe())
            if not site.odirect:
                run.note(f"{name} ({site.fstype}) refuses O_DIRECT: the cache=none peers are left out there, "
                         "and the ring section's local limit uses buffered libaio")
            if set(cfg.sections) - {"scale"}:  # the scale section makes a store of its own
                site.prepare(source)
                if source is None:
                    source = site.raw
                elif not a.keep:
                    sites[0].cleanup()  # the first site's raw file was kept only to be copied here
            run.sample_load(f"{name} prepared")
            for sec, fn in (("nbd", sec_nbd.run), ("cow", sec_cow.run), ("depth", sec_depth.run),
                            ("ring", sec_ring.run), ("meta", sec_meta.latency), ("snaps", sec_meta.continuous),
                            ("forks", sec_meta.forks),
                            ("mem", sec_mem.run), ("scale", sec_scale.run), ("dedup", sec_dedup.run),
                            ("cluster", sec_cluster.run)):
                if sec not in cfg.sections:
                    continue
                if sec in ("meta", "snaps", "forks", "mem", "scale", "dedup", "cluster") and not a.keep:
                    site.release_data_copies()  # no later section reads them
                if sec in ("forks", "mem"):
                    sec_meta.ensure_store(site)
                log(f"== {name}: {sec}")
                try:
                    fn(run, site, cfg)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # one broken section must not lose the others
                    run.note(f"{name}: section {sec} failed: {type(e).__name__}: {e} "
                             f"(server logs in raw/logs-{name}/)")
                    log(f"{name}: section {sec} FAILED: {e}")
                run.sample_load(f"{name} {sec} done")
                run.save()
            if not a.keep:
                site.cleanup(keep=[site.raw] if site.raw == source and name != cfg.fs[-1] else [])
    except KeyboardInterrupt:
        run.note("interrupted: the results are partial")
    finally:
        run.sample_load("end")
        run.save()
        if not a.keep:
            for s in sites:
                s.cleanup()
    report.write(run)
    log(f"bench: summary in {os.path.join(out, 'summary.md')}")
    print(json.dumps({"out": out}))


if __name__ == "__main__":
    main()
