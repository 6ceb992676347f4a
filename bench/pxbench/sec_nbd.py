"""Section 1: the same fio jobs over NBD against Parallax and every peer, interleaved.

Each measurement starts its server, runs one fio job and stops the server, so no server keeps
state (or background work) across another's run; the order of servers rotates per job. Besides
throughput, the server's CPU time per request is recorded (no fio ramp time, so that fio's
request count covers the whole run)."""

import os
import time

from . import fio
from .util import cpu_seconds, log, rotate


def run(run, site, cfg):
    servers = [s for s in site.peers() if cfg.peers is None or s.label in cfg.peers]
    workloads = [w for w in fio.NBD_WORKLOADS if w[0] in cfg.nbd_workloads]
    for rep in range(cfg.reps):
        for wi, (name, rw, bs, depth, jobs) in enumerate(workloads):
            for srv in rotate(servers, rep * len(workloads) + wi):
                out = os.path.join(run.raw_dir, f"nbd-{site.name}-{name}-{srv.label.replace(' ', '_').replace('/', '-')}-{rep}.json")
                try:
                    with srv:
                        res = measure(srv, lambda: fio.nbd(srv.uri(), rw, bs, depth, jobs, cfg.runtime, 0, out,
                                                           size=site.size), cfg.runtime)
                except Exception as e:  # a failed peer is reported, not fatal
                    run.note(f"{site.name}: {srv.label} {name} rep {rep} failed: {e}")
                    continue
                run.record("nbd", fs=site.name, server=srv.label, workload=name, rep=rep, **res)
                log(f"nbd {site.name} {name:20s} {srv.label:28s} {res['iops']:9.0f} IOPS {res['mb_s']:8.1f} MB/s "
                    f"{res['server_cpu_us_per_op'] or 0:6.1f} CPU us/op")


def measure(srv, job, runtime):
    """Runs `job` (a fio run without ramp time) and adds the server's CPU time per request:
    unlike throughput, it hardly depends on what else the machine is doing."""
    pid = srv.pid()
    c0 = cpu_seconds(pid)
    res = job()
    time.sleep(0.3)  # let nbd-server reap its per-connection processes
    c1 = cpu_seconds(pid)
    ops = res["ops"] or res["iops"] * runtime
    res["server_cpu_s"] = c1 - c0
    res["server_cpu_us_per_op"] = (c1 - c0) * 1e6 / ops if ops else None
    return res
