"""Small helpers shared by the benchmark sections: commands, ports, file systems, statistics,
and the run context that keeps every raw measurement."""

import json
import os
import socket
import statistics
import subprocess
import sys
import time

T0 = time.monotonic()


def log(msg):
    """One progress line on stderr, prefixed with the minutes since the run started."""
    el = time.monotonic() - T0
    print(f"[{int(el // 60):02d}:{int(el % 60):02d}] {msg}", file=sys.stderr, flush=True)


def sh(args, check=True, capture=False, timeout=None, env=None, cwd=None):
    """Runs a command (a list) and returns its CompletedProcess; output is captured on request."""
    r = subprocess.run(
        [str(a) for a in args],
        check=False,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        env=env,
        cwd=cwd,
        text=True,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def free_port():
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def fs_type(path):
    return sh(["stat", "-f", "-c", "%T", path], capture=True).stdout.strip()


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def odirect_ok(directory):
    """Whether files in `directory` can be opened with O_DIRECT (tmpfs refuses before Linux 6.6)."""
    p = os.path.join(directory, ".odirect-probe")
    try:
        with open(p, "wb") as f:
            f.write(b"\0" * 4096)
        fd = os.open(p, os.O_RDWR | os.O_DIRECT)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        try:
            os.unlink(p)
        except OSError:
            pass


def rss_kib(pid):
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid):
    """CPU time of a process: all its threads, plus children it has reaped (nbd-server forks a
    process per connection)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14..17
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def quantile(xs, q):
    """Nearest-rank quantile (q in 0..1) of a list of numbers."""
    xs = sorted(xs)
    if not xs:
        return None
    i = min(len(xs) - 1, max(0, int(round(q * len(xs) + 0.5)) - 1))
    return xs[i]


def rotate(items, k):
    k %= len(items)
    return items[k:] + items[:k]


def parse_size(s):
    s = str(s).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def human(n):
    for unit, m in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m:
            v = n / m
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


class Run:
    """One benchmark run: its output directory, its settings and every raw record."""

    def __init__(self, out_dir, settings):
        self.out = out_dir
        self.raw_dir = os.path.join(out_dir, "raw")
        os.makedirs(self.raw_dir, exist_ok=True)
        self.settings = settings
        self.records = []
        self.load_samples = []
        self.notes = []
        self.sample_load("start")

    def sample_load(self, what):
        self.load_samples.append({"t": round(time.monotonic() - T0, 1), "what": what, "load": loadavg()})

    def record(self, section, **fields):
        """Keeps one raw measurement (with the machine's load at the time) and returns it."""
        rec = {"section": section, "t": round(time.monotonic() - T0, 1), "load": loadavg(), **fields}
        self.records.append(rec)
        return rec

    def note(self, text):
        """A line for the summary's notes (a skipped peer, a failed measurement, ...)."""
        log("note: " + text)
        self.notes.append(text)

    def save(self):
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(
                {
                    "settings": self.settings,
                    "load_samples": self.load_samples,
                    "notes": self.notes,
                    "records": self.records,
                },
                f,
                indent=1,
            )
