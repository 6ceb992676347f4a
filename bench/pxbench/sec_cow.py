"""Section 2: the cost of copy-on-write. 4K random writes (QD16) on a VDI before a snapshot,
right after one, and on a fresh fork of it; the peers are a qcow2 internal snapshot
(`qemu-img snapshot -c`) and a qcow2 overlay (`-b base.qcow2`) on the same data.

Every phase runs for the same short window right after the snapshot is taken, so the rate
includes the copying that the first touch of each map node (or qcow2 cluster) costs."""

import os

from . import fio
from .util import log, sh


def _write(run, site, cfg, uri, system, phase, rep):
    """One timed run of 4K random writes. The `before` phase gets a warm-up (fio's ramp time)
    so that it measures the steady rate with warm caches; the phases after a snapshot start
    measuring at once, since their first seconds are what copy-on-write costs."""
    out = os.path.join(run.raw_dir, f"cow-{site.name}-{system.replace(' ', '_').replace('/', '-')}-{phase}-{rep}.json")
    ramp = cfg.cow_ramp if phase == "before" else 0
    res = fio.nbd(uri, "randwrite", "4k", 16, 1, cfg.cow_runtime, ramp, out, size=site.size,
                  extra=["--write_iops_log=" + out[:-5], "--log_avg_msec=1000"])
    first = fio.first_second(out[:-5])
    run.record("cow", fs=site.name, system=system, phase=phase, rep=rep, first_s_iops=first, **res)
    log(f"cow {site.name} {system:28s} {phase:9s} {res['iops']:9.0f} IOPS (first second {first or 0:.0f})")


def run(run, site, cfg):
    qcows = [("qcow2 writeback", "writeback")]
    if site.odirect:
        qcows.append(("qcow2 none/native", "none"))
    overlay = os.path.join(site.dir, "overlay.qcow2")
    px = site.parallax()
    for rep in range(cfg.reps):
        with px:
            ctl = px.control
            _write(run, site, cfg, px.uri("v"), "parallax", "before", rep)
            ctl.call("flush")
            ctl.call("snapshot", vdi="v", snap=f"cow{rep}")
            _write(run, site, cfg, px.uri("v"), "parallax", "snapshot", rep)
            ctl.call("flush")
            ctl.call("fork", src=f"v@cow{rep}", new=f"cowfork{rep}")
            _write(run, site, cfg, px.uri(f"cowfork{rep}"), "parallax", "fork", rep)
            ctl.call("flush")
            ctl.call("delete", name=f"cowfork{rep}", recursive=False)
            ctl.call("delete", name=f"v@cow{rep}", recursive=False)
            ctl.call("flush")
        for label, cache in qcows:
            with site.qemu(label, site.qcow2, "qcow2", cache) as q:
                _write(run, site, cfg, q.uri(), label, "before", rep)
            sh(["qemu-img", "snapshot", "-c", f"cow{rep}", site.qcow2])
            with site.qemu(label, site.qcow2, "qcow2", cache) as q:
                _write(run, site, cfg, q.uri(), label, "snapshot", rep)
            sh(["qemu-img", "snapshot", "-d", f"cow{rep}", site.qcow2])
            sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", site.qcow2, "-F", "qcow2", overlay])
            with site.qemu(label, overlay, "qcow2", cache) as q:
                _write(run, site, cfg, q.uri(), label, "overlay", rep)
            os.unlink(overlay)
