"""fio jobs: the same job description over NBD for every server, or on a local file for the
libaio limit. Returns the numbers the summary needs plus fio's whole JSON for the raw results."""

import json
import os
import signal
import subprocess
import threading

# The workloads of issue 7, section 1: (name, rw, block size, iodepth, jobs).
NBD_WORKLOADS = [
    ("4k-randread-qd16", "randread", "4k", 16, 1),
    ("4k-randread-2xqd32", "randread", "4k", 32, 2),
    ("4k-randwrite-qd16", "randwrite", "4k", 16, 1),
    ("4k-randwrite-2xqd32", "randwrite", "4k", 32, 2),
    ("1m-read-qd8", "read", "1m", 8, 1),
    ("1m-write-qd8", "write", "1m", 8, 1),
]


class FioError(Exception):
    pass


def job_args(rw, bs, depth, jobs, runtime, ramp, size=None):
    args = [f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--numjobs={jobs}", "--group_reporting",
            "--time_based", f"--runtime={runtime}", "--norandommap", "--randrepeat=0"]
    if ramp:
        args.append(f"--ramp_time={ramp}")
    if size:
        args.append(f"--size={size}")
    return args


def run(target_args, rw, bs, depth, jobs, runtime, ramp, out_json, size=None, extra=(), timeout=None):
    """Runs one fio job; `target_args` says where (--ioengine=nbd --uri=... or a file)."""
    args = ["fio", "--name=bench", *target_args, *job_args(rw, bs, depth, jobs, runtime, ramp, size), *extra,
            "--output-format=json", f"--output={out_json}"]
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout or (runtime + ramp) * 4 + 60)
    if r.returncode != 0 or not os.path.exists(out_json):
        raise FioError(f"fio failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return parse(out_json)


def nbd(uri, *a, **kw):
    return run(["--ioengine=nbd", f"--uri={uri}"], *a, **kw)


def parse(path):
    with open(path) as f:
        text = f.read()
    # fio's nbd engine may print a line before the JSON document.
    j = json.loads(text[text.index("{"):])
    job = j["jobs"][0]
    out = {"error": job.get("error", 0)}
    iops = bw = 0.0
    ops = 0
    lat = {}
    for d in ("read", "write"):
        s = job[d]
        iops += s["iops"]
        ops += s.get("total_ios", 0)
        bw += s["bw_bytes"]
        pct = s.get("clat_ns", {}).get("percentile") or {}
        if s["iops"] > 0 and pct:
            lat = {"p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3}
    out.update(iops=iops, mb_s=bw / 1e6, ops=ops, **lat)
    return out


class Background:
    """A fio job running in the background (live writes while snapshotting)."""

    def __init__(self, uri, rw, bs, depth, runtime, out_json, size=None):
        self.out_json = out_json
        args = ["fio", "--name=bg", "--ioengine=nbd", f"--uri={uri}",
                *job_args(rw, bs, depth, 1, runtime, 0, size), "--output-format=json", f"--output={out_json}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.err = ""
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self):
        self.err = self.proc.stderr.read()

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        """Stops the job early (SIGINT: fio still writes its report, and exits with 128)."""
        if self.running():
            self.proc.send_signal(signal.SIGINT)
        return self.finish()

    def finish(self, timeout=600):
        self.proc.wait(timeout)
        self._t.join()
        try:
            return parse(self.out_json)
        except (OSError, ValueError, KeyError) as e:
            raise FioError(f"background fio failed ({self.proc.returncode}): {e}; {self.err.strip()[-500:]}")


def first_second(prefix):
    """IOPS in the first second, from fio's per-second IOPS log (`--write_iops_log=PREFIX`),
    which is removed; None if there is none."""
    path = prefix + "_iops.1.log"
    try:
        with open(path) as f:
            first = f.readline().split(",")
        os.unlink(path)
        return float(first[1])
    except (OSError, IndexError, ValueError):
        return None
