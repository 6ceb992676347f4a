"""Section 5: the block-ring path. `frontend-shim bench` (blkfront over the local shared-memory
ring, attached to the running daemon) against fio with libaio on the raw file of the same file
system — the limit of what the file system itself gives. fio uses O_DIRECT where the file system
accepts it, else buffered I/O (noted in the summary)."""

import json
import os
import subprocess

from . import fio
from .util import log, rotate

# (name, rw, block size, depth per queue, queues, shim extra arguments)
RING_WORKLOADS = [
    ("4k-randread-2xqd32", "randread", "4k", 32, 2, []),
    ("4k-randwrite-2xqd32", "randwrite", "4k", 32, 2, []),
    ("1m-read-qd8", "read", "1m", 8, 1, ["--indirect", "256"]),
    ("1m-write-qd8", "write", "1m", 8, 1, ["--indirect", "256"]),
]


def _shim(site, shim_bin, vdi, rw, bs, depth, queues, extra, seconds, out):
    args = [shim_bin, "--store", site.store, "bench", vdi, "--rw", rw, "--bs", bs, "--depth", str(depth),
            "--queues", str(queues), "--seconds", str(seconds), "--json", *extra]
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=seconds * 4 + 60)
    if r.returncode != 0:
        raise RuntimeError(f"frontend-shim failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    with open(out, "w") as f:
        f.write(r.stdout)
    j = json.loads(r.stdout)
    return {"iops": j["iops"], "mb_s": j["mb_per_s"], "p50_us": j["lat_p50_us"], "p99_us": j["lat_p99_us"],
            "errors": j["errors"], "interrupted": j.get("interrupted", False)}


def run(run, site, cfg):
    direct = 1 if site.odirect else 0
    workloads = [w for w in RING_WORKLOADS if w[0] in cfg.ring_workloads]
    px = site.parallax()
    with px:
        # Reads go to `v`, writes to a fork of it, so reads always find the data.
        px.call("snapshot", vdi="v", snap="ring")
        px.call("fork", src="v@ring", new="ringw")
        for rep in range(cfg.reps):
            for wi, (name, rw, bs, depth, queues, extra) in enumerate(workloads):
                for system in rotate(["ring", "libaio"], rep + wi):
                    out = os.path.join(run.raw_dir, f"ring-{site.name}-{name}-{system}-{rep}.json")
                    try:
                        if system == "ring":
                            vdi = "ringw" if "write" in rw else "v"
                            before = px.call("info", name=vdi)["allocated"]
                            res = _shim(site, cfg.shim_bin, vdi, rw, bs, depth, queues, extra, cfg.runtime, out)
                            after = px.call("info", name=vdi)["allocated"]
                            res["allocated_before"], res["allocated_after"] = before, after
                            if "write" in rw and (after == 0 or after < before // 2):
                                # Zero blocks become holes in Parallax: such writes are not
                                # comparable with fio writing data.
                                res["zero_pages"] = True
                        else:
                            res = fio.run([f"--filename={site.raw}", "--ioengine=libaio", f"--direct={direct}"],
                                          rw, bs, depth, queues, cfg.runtime, 0, out)
                    except Exception as e:
                        run.note(f"{site.name}: ring {system} {name} rep {rep} failed: {e}")
                        continue
                    label = "frontend-shim ring" if system == "ring" else f"fio libaio direct={direct}"
                    run.record("ring", fs=site.name, system=label, workload=name, rep=rep, **res)
                    log(f"ring {site.name} {name:20s} {label:22s} {res['iops']:9.0f} IOPS {res['mb_s']:8.1f} MB/s")
