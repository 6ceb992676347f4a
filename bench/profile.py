#!/usr/bin/env python3
"""Profiles the Parallax daemon under one benchmark workload with `perf record`.

Usage: bench/profile.py WORKLOAD [--dir /dev/shm] [--size 1G] [--seconds 10] [--callgraph]
                        [--out DIR] [--peer nbdkit|nbd-server|qemu-nbd]

WORKLOAD: one of section 1's fio jobs (4k-randread-qd16, 4k-randread-2xqd32, 4k-randwrite-qd16,
4k-randwrite-2xqd32, 1m-read-qd8, 1m-write-qd8), `ring-BS-RW` (frontend-shim, e.g. ring-4k-randread, ring-1m-read), `snapshot` or
`fork` (a loop of control-socket requests on a VDI under no load), `snapshot-live` or `fork-live`
(the same while fio writes 4K random at QD16 to the VDI). Prints the hottest symbols
(self time) and the per-thread CPU split; keeps perf.data in --out for `perf report -i`.
With --peer, profiles that peer server instead (for comparison).
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from pxbench import fio  # noqa: E402
from pxbench.servers import Nbdkit, NbdServer  # noqa: E402
from pxbench.site import Site  # noqa: E402
from pxbench.util import Run, parse_size  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--callgraph", action="store_true", help="record DWARF call graphs (large perf.data)")
    ap.add_argument("--out", default="/tmp/parallax-profile")
    ap.add_argument("--peer", choices=["nbdkit", "nbd-server", "qemu-nbd"])
    ap.add_argument("--offcpu", action="store_true",
                    help="record where threads block (sched_switch with call graphs) instead of CPU samples")
    a = ap.parse_args()
    bin_dir = os.environ.get("PX_BENCH_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target")), "release")
    os.makedirs(a.out, exist_ok=True)
    run = Run(a.out, {})
    site = Site(run, "profile", a.dir, parse_size(a.size), os.path.join(bin_dir, "parallax"))
    try:
        site.prepare()
        if a.peer == "nbdkit":
            srv = Nbdkit("nbdkit", site.raw, site.dir)
        elif a.peer == "nbd-server":
            srv = NbdServer("nbd-server", site.raw, site.dir)
        elif a.peer == "qemu-nbd":
            srv = site.qemu("qemu-nbd", site.raw, "raw", "writeback")
        else:
            srv = site.parallax()
        with srv:
            perf_data = os.path.join(a.out, "perf.data")
            cg = ["--call-graph", "dwarf,32768"] if a.callgraph else []
            ev = ["-e", "sched:sched_switch", "--call-graph", "dwarf,16384"] if a.offcpu else ["-F", "1999", *cg]
            perf = subprocess.Popen(["perf", "record", *ev, "-o", perf_data, "-p", str(srv.pid())],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            t0 = time.monotonic()
            result = drive(a, site, srv, bin_dir)
            elapsed = time.monotonic() - t0
            perf.send_signal(2)
            perf.wait()
        print(f"# {a.workload} on {srv.label} ({site.fstype}): {result} in {elapsed:.1f}s")
        subprocess.run(["perf", "report", "-i", perf_data, "--stdio", "--no-children", "--sort", "comm",
                        "--percent-limit", "2"], stderr=subprocess.DEVNULL)
        subprocess.run(["perf", "report", "-i", perf_data, "--stdio", "--no-children", "--sort", "dso,symbol",
                        "--percent-limit", "0.7"], stderr=subprocess.DEVNULL)
    finally:
        site.cleanup()


def drive(a, site, srv, bin_dir):
    if a.workload.split("-")[0] in ("snapshot", "fork"):
        lat = []
        srv.call("snapshot", vdi="v", snap="base")
        bg = None
        if a.workload.endswith("-live"):
            bg = fio.Background(srv.uri("v"), "randwrite", "4k", 16, a.seconds + 30,
                                os.path.join(a.out, "bg.json"), size=site.size)
            time.sleep(1)
        deadline = time.monotonic() + a.seconds
        i = 0
        while time.monotonic() < deadline:
            if a.workload.startswith("snapshot"):
                lat.append(srv.control.timed("snapshot", vdi="v", snap=f"s{i}"))
            else:
                lat.append(srv.control.timed("fork", src="v@base", new=f"f{i}"))
            i += 1
            time.sleep(0.005)
        writes = f", live writes {bg.stop()['iops']:.0f} IOPS" if bg else ""
        lat.sort()
        return (f"{len(lat)} ops, p50 {lat[len(lat) // 2]:.0f} us, p90 {lat[int(len(lat) * 0.9)]:.0f} us, "
                f"p99 {lat[int(len(lat) * 0.99)]:.0f} us, max {lat[-1]:.0f} us{writes}")
    if a.workload.startswith("ring-"):
        _, bs, rw = a.workload.split("-")
        shape = ["--depth", "32", "--queues", "2"] if bs == "4k" else ["--depth", "8", "--queues", "1",
                                                                        "--indirect", "256"]
        out = subprocess.run([os.path.join(bin_dir, "frontend-shim"), "--store", site.store, "bench", "v", "--rw",
                              rw, "--bs", bs, *shape, "--seconds", str(a.seconds), "--json"],
                             capture_output=True, text=True, check=True).stdout
        return out.replace("\n", " ")
    wl = {w[0]: w for w in fio.NBD_WORKLOADS}[a.workload]
    _, rw, bs, depth, jobs = wl
    r = fio.nbd(srv.uri(), rw, bs, depth, jobs, a.seconds, 0, os.path.join(a.out, "fio.json"), size=site.size)
    return f"{r['iops']:.0f} IOPS, {r['mb_s']:.1f} MB/s"


if __name__ == "__main__":
    main()
