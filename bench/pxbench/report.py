"""The Markdown summary (medians, ratios, each target met or not) and the gnuplot plots, made
from the raw records of one run. `bench/run.py --report DIR` remakes them from results.json."""

import json
import os
import re
import statistics
import subprocess
from collections import defaultdict

from .util import human, median, quantile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = os.path.join(HERE, "limits.md")


def _fmt(x, unit=""):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def _ratio(a, b):
    return a / b if a is not None and b else None


def _met(ok):
    return "–" if ok is None else ("**met**" if ok else "**not met**")


def _ms(us):
    return None if us is None else us / 1000


def _group(records, section, *keys, value="iops"):
    """Median of `value` over reps, keyed by the tuple of `keys`."""
    acc = defaultdict(list)
    for r in records:
        if r["section"] == section and r.get(value) is not None:
            acc[tuple(r[k] for k in keys)].append(r[value])
    return {k: median(v) for k, v in acc.items()}


class Summary:
    def __init__(self, data, out):
        self.d = data
        self.s = data["settings"]
        self.r = data["records"]
        self.out = out
        self.lines = []
        self.targets = []
        self.fss = [site["name"] for site in self.s.get("sites", [])]

    def p(self, line=""):
        self.lines.append(line)

    def table(self, head, rows):
        self.p("| " + " | ".join(head) + " |")
        self.p("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
        for row in rows:
            self.p("| " + " | ".join(str(c) for c in row) + " |")
        self.p()

    def target(self, name, fs, measured, ok):
        self.targets.append((name, fs, measured, _met(ok)))

    # -- sections -------------------------------------------------------------------------------

    def header(self):
        s = self.s
        m = s["machine"]
        loads = [x["load"][0] for x in self.d["load_samples"]] + [r["load"][0] for r in self.r]
        self.p(f"# Parallax benchmark, {s['date']}{' (quick subset)' if s.get('quick') else ''}")
        self.p()
        self.p(f"Commit `{s['git']}`; {m['cpus']} CPUs ({m['cpu']}), {human(m['mem_bytes'])} RAM, "
               f"Linux {m['kernel']}. {'; '.join(m['tools'].values())}.")
        self.p()
        if loads:
            self.p(f"**Machine load** (1-minute load average, sampled at every measurement): "
                   f"min {min(loads):.1f}, median {statistics.median(loads):.1f}, max {max(loads):.1f} "
                   f"on {m['cpus']} CPUs, counting the benchmark's own client and server threads (anything "
                   f"else running shows as load above that). Single numbers are noisy: every figure is the median of {s['reps']} interleaved run(s), and the raw "
                   f"records (`results.json`, `raw/`) keep each run with the load at its time.")
            self.p()
        sites = ", ".join(f"{x['name']} = `{x['dir']}` ({x['fstype']}, O_DIRECT "
                          f"{'accepted' if x['odirect'] else 'refused'})" for x in s.get("sites", []))
        self.p(f"Data: a {human(s['size'])} VDI of random data; a raw file, a qcow2 file and a Parallax "
               f"store holding the same bytes side by side on each file system: {sites}. "
               f"fio runs: {s['runtime']} s each (no ramp time, so that the server's CPU time "
               f"covers exactly the requests fio counted).")
        self.p()

    def nbd(self):
        med = _group(self.r, "nbd", "fs", "workload", "server")
        mbs = _group(self.r, "nbd", "fs", "workload", "server", value="mb_s")
        cpu = _group(self.r, "nbd", "fs", "workload", "server", value="server_cpu_us_per_op")
        if not med:
            return
        self.p("## 1. fio over NBD")
        self.p()
        self.p("4K jobs in IOPS, 1 MiB jobs in MB/s; `2xqd32` is two fio jobs (two NBD connections) at "
               "QD32 each. The ratio is Parallax over the best peer in that row.")
        self.p()
        for fs in self.fss:
            wls = [w for w in self.s["nbd_workloads"] if any(k[0] == fs and k[1] == w for k in med)]
            if not wls:
                continue
            servers = []
            for k in med:
                if k[0] == fs and k[2] not in servers:
                    servers.append(k[2])
            servers.sort(key=lambda x: (x != "parallax", x))
            rows, r4k, rseq = [], [], []
            for w in wls:
                src = mbs if w.startswith("1m") else med
                vals = {sv: src.get((fs, w, sv)) for sv in servers}
                peers = {sv: v for sv, v in vals.items() if sv != "parallax" and v is not None}
                best = max(peers, key=peers.get) if peers else None
                ratio = _ratio(vals.get("parallax"), peers.get(best)) if best else None
                (r4k if w.startswith("4k") else rseq).append((w, ratio))
                rows.append([w] + [_fmt(vals[sv]) for sv in servers] + [best or "–", f"**{_fmt(ratio)}×**"])
            self.p(f"### {fs}")
            self.p()
            self.table(["workload"] + servers + ["best peer", "Parallax / best"], rows)
            cpu_rows = []
            cpu4k = []
            for w in wls:
                vals = {sv: cpu.get((fs, w, sv)) for sv in servers}
                peers = {sv: v for sv, v in vals.items() if sv != "parallax" and v}
                best = min(peers, key=peers.get) if peers else None
                lean = _ratio(vals.get("parallax"), peers.get(best)) if best else None
                if w.startswith("4k") and lean is not None:
                    cpu4k.append((w, lean))
                cpu_rows.append([w] + [_fmt(vals[sv]) for sv in servers] +
                                [best or "–", f"{_fmt(_ratio(vals.get('parallax'), peers.get(best)))}×" if best else "–"])
            if any(v for k, v in cpu.items() if k[0] == fs):
                self.p(f"Server CPU time per request (µs, all threads; lower is better) on {fs} — less "
                       "sensitive to the machine's load than throughput:")
                self.p()
                self.table(["workload"] + servers + ["leanest peer", "Parallax / leanest"], cpu_rows)
            for name, rs, goal in (("NBD 4K random ≥ 1.2× best peer", r4k, 1.2),
                                   ("NBD 1 MiB sequential ≥ 1.0× best peer", rseq, 1.0)):
                rs = [(w, x) for w, x in rs if x is not None]
                if rs:
                    worst = min(x for _, x in rs)
                    self.target(name, fs, ", ".join(f"{w} {x:.2f}×" for w, x in rs), worst >= goal)
            if cpu4k:
                self.target("server CPU per 4K request ≤ 1.0× leanest peer", fs,
                            ", ".join(f"{w} {x:.2f}×" for w, x in cpu4k), max(x for _, x in cpu4k) <= 1.0)

    def cow(self):
        med = _group(self.r, "cow", "fs", "system", "phase")
        first = _group(self.r, "cow", "fs", "system", "phase", value="first_s_iops")
        if not med:
            return
        self.p("## 2. Copy-on-write: 4K random writes (QD16) before and right after a snapshot")
        self.p()
        self.p(f"Each phase is a {self.s['cow_runtime']} s run started right after the snapshot, fork "
               "or overlay was made (first-second IOPS in brackets). Ratios are to the same system's "
               "rate before the snapshot. Peers: a qcow2 internal snapshot (`qemu-img snapshot -c`) "
               "and a fresh qcow2 overlay backed by the same file.")
        self.p()
        for fs in self.fss:
            systems = []
            for k in med:
                if k[0] == fs and k[1] not in systems:
                    systems.append(k[1])
            if not systems:
                continue
            rows = []
            for sy in systems:
                b = med.get((fs, sy, "before"))
                cells = [sy, _fmt(b)]
                for ph in ("snapshot", "fork" if sy == "parallax" else "overlay"):
                    v = med.get((fs, sy, ph))
                    cells.append(f"{_fmt(v)} ({_fmt(first.get((fs, sy, ph)))}) = **{_fmt(_ratio(v, b))}×**")
                    if sy == "parallax" and v is not None:
                        # Judged on the whole window and on its first second, whichever is worse.
                        f1 = _ratio(first.get((fs, sy, ph)), b)
                        worst = min(x for x in (_ratio(v, b), f1) if x is not None)
                        self.target(f"writes after a {ph} ≥ 0.5× before", fs,
                                    f"{_ratio(v, b):.2f}×" + (f" (first second {f1:.2f}×)" if f1 else ""),
                                    worst >= 0.5)
                rows.append(cells)
            self.p(f"### {fs}")
            self.p()
            self.table(["system", "before (IOPS)", "after snapshot", "on a fork / overlay"], rows)

    def depth(self):
        med = _group(self.r, "depth", "fs", "system", "depth")
        cpu = _group(self.r, "depth", "fs", "system", "depth", value="server_cpu_us_per_op")
        if not med:
            return
        self.p("## 3. Random reads (4K, QD16) against snapshot depth")
        self.p()
        self.p("Parallax: a chain of snapshot → fork generations, each fork with 16 random 4K writes of "
               "its own; the VDI read is the last of the chain. qcow2: a backing chain of overlays, "
               "each with 16 random 4K writes, served by qemu-nbd (writeback). Ratio to depth 0.")
        self.p()
        rows = []
        plot = defaultdict(list)
        for (fs, sy, d), v in sorted(med.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            base = med.get((fs, sy, 0))
            rows.append([fs, sy, d, _fmt(v), f"{_fmt(_ratio(v, base))}×", _fmt(cpu.get((fs, sy, d))),
                         f"{_fmt(_ratio(cpu.get((fs, sy, d)), cpu.get((fs, sy, 0))))}×"])
            plot[f"{sy} ({fs})"].append((d, v))
            if sy == "parallax" and d == max(self.s["depths"]) and base:
                c = _ratio(cpu.get((fs, sy, 0)), cpu.get((fs, sy, d)))
                self.target(f"reads at depth {d} within 5% of depth 0", fs,
                            f"{_ratio(v, base):.2f}× IOPS" + (f" ({c:.2f}× by CPU per read)" if c else ""),
                            _ratio(v, base) >= 0.95)
        self.table(["fs", "system", "depth", "IOPS", "vs depth 0", "server CPU µs/read", "vs depth 0"], rows)
        if self._plot("depth", "Random 4K reads against snapshot depth", "snapshot / backing-chain depth",
                      "IOPS (median)", plot, logx=True):
            self.p("![throughput against depth](depth.png)")
            self.p()

    def meta(self):
        recs = [r for r in self.r if r["section"] == "meta-latency"]
        if recs:
            self.p("## 4. Snapshot and fork latency against VDI size")
            self.p()
            self.p(f"{self.s['meta_ops']} snapshots of the VDI, then as many forks of its first "
                   "snapshot, each timed on the control socket (connect to reply; a snapshot is durable "
                   "when it returns, so each includes a flush of the intent log: one fsync). The VDIs "
                   "are sparse, with 4096 4K blocks spread evenly over them. `live`: while fio writes 4K "
                   "random at QD16 to the same VDI.")
            self.p()
            rows = []
            plot = defaultdict(list)
            worst = defaultdict(lambda: (0, None))
            for r in sorted(recs, key=lambda r: (r["fs"], r["op"], r["during"], r["vdi_size"])):
                rows.append([r["fs"], human(r["vdi_size"]), r["op"], r["during"], _fmt(_ms(r["p50_us"])),
                             _fmt(_ms(r["p99_us"])), _fmt(_ms(r["max_us"])), r["n"],
                             _fmt(r.get("live_write_iops"))])
                if r["p99_us"] is not None:
                    plot[f"{r['op']} p99, {r['during']} ({r['fs']})"].append((r["vdi_size"] >> 30, r["p99_us"]))
                    key = (r["fs"], r["during"])
                    if r["p99_us"] >= worst[key][0]:
                        worst[key] = (r["p99_us"], f"{r['op']} {human(r['vdi_size'])}")
            self.table(["fs", "VDI size", "op", "during", "p50 ms", "p99 ms", "max ms", "n",
                        "live write IOPS"], rows)
            hello = [r for r in self.r if r["section"] == "control-floor"]
            if hello:
                self.p("The control socket's own round trip (a `hello` request, same loop): " + "; ".join(
                    f"{r['fs']}: p50 {_fmt(_ms(r['p50_us']))} ms, p99 {_fmt(_ms(r['p99_us']))} ms"
                    for r in hello) + ".")
                self.p()
            floors = [r for r in self.r if r["section"] == "fsync-floor"]
            if floors:
                self.p("The floor: one `fdatasync` after a 4K write on each file system (fio), alone "
                       "(`idle`) and while another job writes 4K blocks at random into the same file at "
                       f"{_fmt(max(r.get('load_iops', 0) for r in floors))} IOPS (`live`: each sync then "
                       "writes out that job's blocks too, as a snapshot's sync does the live writes); a "
                       "durable snapshot or fork needs one (the target allows two and 1 ms). " + "; ".join(
                           f"{r['fs']} {r.get('during', 'idle')}: p50 {_fmt(_ms(r['p50_us']))} ms, "
                           f"p99 {_fmt(_ms(r['p99_us']))} ms" for r in floors) + ".")
                self.p()
            # Runs from before the loaded floor have one floor per file system, taken idle.
            floor = {(r["fs"], r.get("during", "idle")): r["p99_us"] for r in floors}
            for (fs, load), (p99, where) in sorted(worst.items()):
                # tmpfs: under 1 ms. A disk: two fdatasyncs (its floor under the same load) + 1 ms, as
                # issue 13 set it when a snapshot took two (it takes one now).
                f = floor.get((fs, load), floor.get((fs, "idle")))
                limit = 1000 if fs == "tmpfs" or f is None else 2 * f + 1000
                self.target(f"snapshot and fork p99 ≤ {limit / 1000:.2f} ms at every size ({load})", fs,
                            f"worst p99 {p99 / 1000:.2f} ms ({where})", p99 <= limit)
            if self._plot("latency", "Snapshot and fork latency (p99) against VDI size", "VDI size (GiB)",
                          "p99 latency (µs)", plot, logx=True, logy=True):
                self.p("![latency against VDI size](latency.png)")
                self.p()
        storms = [r for r in self.r if r["section"] == "fork-storm"]
        if storms:
            self.p("### Many forks of one template")
            self.p()
            self.table(["fs", "forks", "total s", "mean ms", "p50 ms", "p99 ms", "store bytes per fork"],
                       [[r["fs"], r["forks"], _fmt(r["seconds"]), _fmt(_ms(r["mean_us"])), _fmt(_ms(r["p50_us"])),
                         _fmt(_ms(r["p99_us"])), _fmt(r["bytes_per_fork"])] for r in storms])

    def snaps(self):
        recs = [r for r in self.r if r["section"] == "snaps"]
        if not recs:
            return
        self.p("### Continuous snapshots")
        self.p()
        self.p(f"fio 4K random writes at QD16 for {self.s.get('snap_seconds', '?')} s over a 1 GiB VDI "
               "(4096 blocks spread over it), with and without a snapshot of it every 10 ms through "
               "the control socket; each repetition on a fresh store, the two variants in rotating "
               "order. Medians over repetitions; latencies over all snapshots taken.")
        self.p()
        rows = []
        for fs in self.fss:
            with_ = [r for r in recs if r["fs"] == fs and r["mode"] == "with"]
            without = [r for r in recs if r["fs"] == fs and r["mode"] == "without"]
            if not with_ or not without:
                continue
            a = median([r["iops"] for r in with_])
            b = median([r["iops"] for r in without])
            lat = [x for r in with_ for x in r["samples_us"]]
            ratio = _ratio(a, b)
            rows.append([fs, _fmt(b), _fmt(a), f"**{_fmt(ratio)}×**",
                         _fmt(median([r["snapshots_per_s"] for r in with_])), len(lat),
                         _fmt(_ms(quantile(lat, 0.5))), _fmt(_ms(quantile(lat, 0.99))), _fmt(_ms(max(lat)))])
            if ratio is not None:
                self.target("write IOPS while snapshotting every 10 ms ≥ 0.9× without", fs,
                            f"{ratio:.2f}× (snapshot p99 {quantile(lat, 0.99) / 1000:.2f} ms)", ratio >= 0.9)
        self.table(["fs", "write IOPS without", "with snapshots", "ratio", "snapshots/s", "n", "p50 ms",
                    "p99 ms", "max ms"], rows)
        prune = [r for r in recs if r["mode"] == "pruning"]
        if not prune:
            return
        self.p()
        self.p("**Pruning under load.** Before its run, a fill phase snapshots the VDI every 10 ms under "
               "the same writes, naming the snapshots as the scheduler does but ten days old; then, "
               "0.2 s into the measured run, a schedule (`--every 1h --keep 1h:1h`) is set on the VDI, "
               "and the daemon's scheduler deletes all of them while fio writes.")
        self.p()
        rows = []
        for fs in self.fss:
            p = [r for r in prune if r["fs"] == fs]
            without = [r for r in recs if r["fs"] == fs and r["mode"] == "without"]
            if not p or not without:
                continue
            a = median([r["iops"] for r in p])
            b = median([r["iops"] for r in without])
            secs = [r["prune_seconds"] for r in p if r.get("prune_seconds") is not None]
            ratio = _ratio(a, b)
            rows.append([fs, _fmt(b), _fmt(a), f"**{_fmt(ratio)}×**", _fmt(median([r["pruned"] for r in p])),
                         _fmt(median(secs)) if len(secs) == len(p) else "not all within the run"])
            if ratio is not None:
                self.target("write IOPS while the scheduler prunes ~1000 snapshots ≥ 0.9× without", fs,
                            f"{ratio:.2f}×", ratio >= 0.9)
        self.table(["fs", "write IOPS without", "while pruning", "ratio", "snapshots pruned",
                    "s to prune them all"], rows)

    def ring(self):
        med = _group(self.r, "ring", "fs", "workload", "system")
        mbs = _group(self.r, "ring", "fs", "workload", "system", value="mb_s")
        if not med:
            return
        self.p("## 5. The block-ring path: frontend-shim against local libaio")
        self.p()
        self.p("`frontend-shim bench` attached to the daemon (4K: 2 queues × depth 32; 1 MiB: 1 queue × "
               "depth 8 with 256-segment indirect requests) against fio libaio on the raw file of the "
               "same file system with the same jobs × depth. 4K in IOPS, 1 MiB in MB/s.")
        self.p()
        zero = {(r["fs"], r["workload"]) for r in self.r if r["section"] == "ring" and r.get("zero_pages")}
        if zero:
            self.p("**The ring write rows are not comparable**: `frontend-shim bench` wrote zero-filled "
                   "pages (the VDI's allocated blocks fell during the run), which Parallax stores as "
                   "holes without writing data. They are shown but not counted against the target.")
            self.p()
        rows = []
        for fs in self.fss:
            for w in self.s["ring_workloads"]:
                src = mbs if w.startswith("1m") else med
                ring = src.get((fs, w, "frontend-shim ring"))
                lim_key = [k for k in src if k[0] == fs and k[1] == w and k[2].startswith("fio libaio")]
                if ring is None and not lim_key:
                    continue
                lim = src.get(lim_key[0]) if lim_key else None
                ratio = _ratio(ring, lim)
                zp = (fs, w) in zero
                rows.append([fs, w + (" (zero pages)" if zp else ""), _fmt(ring), _fmt(lim),
                             lim_key[0][2] if lim_key else "–", f"**{_fmt(ratio)}×**"])
                if zp:
                    self.target("ring path ≥ 0.8× local libaio", fs, f"{w}: not measurable (shim writes zeros)", None)
                elif ratio is not None:
                    self.target("ring path ≥ 0.8× local libaio", fs, f"{w} {ratio:.2f}×", ratio >= 0.8)
        self.table(["fs", "workload", "ring", "local limit", "limit job", "ring / limit"], rows)

    def memory(self):
        recs = [r for r in self.r if r["section"] == "memory"]
        if not recs:
            return
        self.p("## 6. Daemon memory against open VDIs")
        self.p()
        self.p("A freshly started daemon; each open VDI is one NBD connection to its own fork of a 1 GiB "
               "template, all under a light round robin of 4K reads (one write in ten).")
        self.p()
        self.table(["fs", "VDIs open", "RSS MiB", "peak RSS MiB", "requests"],
                   [[r["fs"], r["vdis"], _fmt(r["VmRSS"] / 1024), _fmt(r["VmHWM"] / 1024), r["requests"]]
                    for r in recs])
        top = max(self.s["mem_vdis"])
        for r in recs:
            if r["vdis"] == top:
                self.target(f"{top} open VDIs < 256 MiB RSS", r["fs"], f"{r['VmRSS'] / 1024:.0f} MiB",
                            r["VmRSS"] < 256 * 1024 if top >= 1000 else None)

    def dedup(self):
        if not any(r["section"].startswith("dedup_") for r in self.r):
            return
        self.p("## 8. Dedup")
        self.p()
        self.p("Each figure against its own baseline in the same run (medians over the interleaved reps). "
               "`write`: fio with unique data (`--refill_buffers`) on a fresh VDI, inline dedup on against "
               "off. `copy`: nbdcopy of random data into a fresh VDI of a store that holds that data already "
               "(every block a duplicate) against an empty store. `pass`: `parallax dedup` over the data "
               "stored twice. `read`: a VDI whose blocks the pass pointed at the other copy, against the "
               "same VDI before the pass. `forks`: 20 forks of a template, each writing the same bytes "
               "and some of its own. `ram`: daemon RSS growth per unique block over four parts of N "
               "unique blocks after two parts of warm-up (map node cache held at 1024 nodes, refcount "
               "pages at 64, index leaves at 1024).")
        self.p()
        wr = _group(self.r, "dedup_write", "fs", "job", "inline")
        wmb = _group(self.r, "dedup_write", "fs", "job", "inline", value="mb_s")
        rows = []
        for (fs, job, inline), v in sorted(wr.items()):
            if inline != "on":
                continue
            off = wr.get((fs, job, "off"))
            big = job.startswith("1m")
            on_v = wmb[(fs, job, "on")] if big else v
            off_v = wmb.get((fs, job, "off")) if big else off
            ratio = _ratio(on_v, off_v)
            rows.append([fs, f"write {job}", _fmt(on_v, " MB/s" if big else " IOPS"),
                         _fmt(off_v, " MB/s" if big else " IOPS"), _fmt(ratio, "×")])
            self.target(f"dedup: {job} unique data, inline on / off ≥ 0.8×", fs, _fmt(ratio, "×"),
                        None if ratio is None else ratio >= 0.8)
        cp = _group(self.r, "dedup_dup", "fs", "case", value="mb_s")
        for fs in sorted({k[0] for k in cp}):
            d, u = cp.get((fs, "duplicate")), cp.get((fs, "unique"))
            ratio = _ratio(d, u)
            rows.append([fs, "copy: duplicate / unique data", _fmt(d, " MB/s"), _fmt(u, " MB/s"), _fmt(ratio, "×")])
            self.target("dedup: writing duplicate / unique data ≥ 1.0×", fs, _fmt(ratio, "×"),
                        None if ratio is None else ratio >= 1.0)
        rd = _group(self.r, "dedup_read", "fs", "job", "case")
        rmb = _group(self.r, "dedup_read", "fs", "job", "case", value="mb_s")
        for (fs, job, case), v in sorted(rd.items()):
            if case != "deduped":
                continue
            big = job.startswith("1m")
            a = rmb[(fs, job, "deduped")] if big else v
            b = rmb.get((fs, job, "plain")) if big else rd.get((fs, job, "plain"))
            ratio = _ratio(a, b)
            rows.append([fs, f"read {job}: deduped / not", _fmt(a, " MB/s" if big else " IOPS"),
                         _fmt(b, " MB/s" if big else " IOPS"), _fmt(ratio, "×")])
            self.target(f"dedup: {job} of deduplicated data / the same undeduplicated ≥ 0.95×", fs,
                        _fmt(ratio, "×"), None if ratio is None else ratio >= 0.95)
        self.table(["fs", "measure", "dedup", "baseline", "ratio"], rows)
        ps = _group(self.r, "dedup_pass", "fs", value="mb_s")
        for fs, v in sorted(ps.items()):
            self.target("dedup: background pass over existing data ≥ 300 MB/s (tmpfs)", fs[0], _fmt(v, " MB/s"),
                        v >= 300 if fs[0] == "tmpfs" else None)
        rows = []
        for r in (x for x in self.r if x["section"] == "dedup_forks"):
            rows.append([r["fs"], r["forks"], human(r["shared_bytes"]), human(r["own_bytes"]),
                         human(r["grew_bytes"]), human(r["target_bytes"]), human(r["without_dedup_bytes"]),
                         _fmt(r["seconds"], " s")])
            self.target(f"dedup: {r['forks']} forks writing the same {human(r['shared_bytes'])} + "
                        f"{human(r['own_bytes'])} each: stored ≤ shared + forks × own + 2 %", r["fs"],
                        human(r["grew_bytes"]), r["grew_bytes"] <= r["target_bytes"])
        if rows:
            self.table(["fs", "forks", "same", "own each", "store grew", "target", "without dedup", "time"], rows)
        rows = []
        for r in (x for x in self.r if x["section"] == "dedup_ram"):
            # Growth measured from the end of the warm-up parts (older runs: one, of two).
            start = r["rss_kib"][r.get("warm_parts", 1) - 1]
            rows.append([r["fs"], r["blocks"], f"{start / 1024:.1f} → {r['rss_kib'][-1] / 1024:.1f}",
                         _fmt(r["bytes_per_block"], " B"), r["index_entries"], human(r["filter_bytes"])])
            self.target("dedup: RAM per unique 4 KiB block (RSS growth) ≤ 4 B", r["fs"],
                        _fmt(r["bytes_per_block"], " B"), r["bytes_per_block"] <= 4)
        if rows:
            self.table(["fs", "unique blocks measured", "RSS MiB", "per block", "index entries", "filter"], rows)

    def scale(self):
        stores = [r for r in self.r if r["section"] == "scale-store"]
        if not stores:
            return
        ops = [r for r in self.r if r["section"] == "scale-op"]
        self.p("## 7. The registry at scale")
        self.p()
        self.p("One store filled by the `scale` driver (the store library, no daemon): at each stage 90 % of the "
               "entries are forks of one template snapshot, 10 % snapshots of one VDI (100,000 at a million). "
               "Each operation is timed on a sample spread over the registry, durable on return (a flush of "
               "the intent log each). For scale: dm-thin numbers thin devices with 24 bits and caps its "
               "metadata at 16 GiB, an RBD clone chain is at most 16 deep, and `zfs list` has been reported "
               "taking 9.5 min at 118k snapshots.")
        self.p()
        names = ["create", "fork", "snapshot", "snapshot_fork", "delete", "delete_fork", "delete_snapshot",
                 "stat", "info_vdi", "info_snapshot", "open", "subtree", "list_prefix"]
        for fs in sorted({r["fs"] for r in stores}):
            sizes = sorted({r["entries"] for r in stores if r["fs"] == fs})
            by = {(r["entries"], r["op"]): r for r in ops if r["fs"] == fs}
            rows = []
            for op in names:
                row = [op]
                for n in sizes:
                    r = by.get((n, op))
                    row.append(f"{_fmt(r['p50_us'])} / {_fmt(r['p99_us'])}" if r else "–")
                rows.append(row)
            row = ["list (all; first entry)"]
            for n in sizes:
                r = by.get((n, "list_all"))
                row.append(f"{_fmt(r['total_us'] / 1e3)} ms; {_fmt(r['first_us'])} us" if r else "–")
            rows.append(row)
            self.p(f"Latency p50 / p99 in µs on {fs}:")
            self.p()
            self.table(["operation"] + [f"{n:,} entries" for n in sizes], rows)
            self.table(["entries", "populate s", "bytes per fork", "store used", "store file"],
                       [[f"{r['entries']:,}", _fmt(r["populate_s"]), _fmt(r["meta_bytes_per_fork"]),
                         human(r["used_bytes"]), human(r["store_file_bytes"])]
                        for r in stores if r["fs"] == fs])
        lists = [r for r in self.r if r["section"] == "scale-list"]
        daemons = [r for r in self.r if r["section"] == "scale-daemon"]
        if lists:
            self.p("Through `parallax serve` on the full store (the CLI's time, process start included):")
            self.p()
            self.table(["fs", "entries", "command", "first line ms", "total s", "lines"],
                       [[r["fs"], f"{r['entries']:,}", f"`vdi {r['command']}`", _fmt(r["first_line_s"] * 1e3),
                         _fmt(r["total_s"]), r["lines"]] for r in lists])
        if daemons:
            self.table(["fs", "entries", "daemon RSS at start MiB", "after the lists MiB", "peak MiB"],
                       [[r["fs"], f"{r['entries']:,}", _fmt(r["rss_start"]["VmRSS"] / 1024),
                         _fmt(r["rss_after_lists"]["VmRSS"] / 1024), _fmt(r["rss_after_lists"]["VmHWM"] / 1024)]
                        for r in daemons])

    def cluster(self):
        recs = [r for r in self.r if r["section"] == "cluster"]
        if not recs:
            return
        s = self.s
        self.p("## 9. A store in Ceph against RBD")
        self.p()
        self.p(f"One throwaway cluster (`scripts/cluster.sh`: a mon, one memstore OSD, etcd) holds both a "
               f"Parallax store (`--store rados:parallax/bench`, local cache on the file system named) and an "
               f"RBD image, each a {human(s.get('cluster_vdi', 1 << 30))} image whose first "
               f"{human(s.get('cluster_data', 0))} are the same random data; every job stays in that region. "
               "RBD is served by qemu-nbd (rbd driver, `cache=writeback`). `fork-write`: 4K random writes "
               "(QD16) on a fresh fork of a snapshot against a fresh clone of a protected RBD snapshot "
               f"({s.get('cow_runtime')} s from the moment it was made, first-second IOPS in brackets); "
               f"`vdi-write`: the same on the VDI and the image ({s.get('runtime')} s), and `vdi-write-flush` "
               "with a flush after every 32 writes; `warm-read`: 4K random "
               "reads (QD16) after reading the region once, against the same data in a local-file store; "
               "`fork-latency`: forks through the control socket against `rbd clone` CLI calls (process start "
               "included); `failover`: SIGKILL of host A's daemon to host B's first answered 4K read.")
        self.p()
        iops = _group(self.r, "cluster", "fs", "metric", "system")
        first = _group(self.r, "cluster", "fs", "metric", "system", value="first_s_iops")
        p50 = _group(self.r, "cluster", "fs", "metric", "system", value="p50_us")
        p99 = _group(self.r, "cluster", "fs", "metric", "system", value="p99_us")
        val = _group(self.r, "cluster", "fs", "metric", "system", value="value")
        rows = []
        for fs in sorted({r["fs"] for r in recs}):
            for metric, px, peer, goal in (("fork-write", "parallax", "rbd", 10.0),
                                           ("vdi-write", "parallax", "rbd", 1.0),
                                           ("vdi-write-flush", "parallax", "rbd", 1.0),
                                           ("warm-read", "parallax rados", "parallax local", 0.9)):
                a, b = iops.get((fs, metric, px)), iops.get((fs, metric, peer))
                if a is None and b is None:
                    continue
                ratio = _ratio(a, b)
                fa, fb = first.get((fs, metric, px)), first.get((fs, metric, peer))
                rows.append([fs, metric, f"{_fmt(a)} ({_fmt(fa)})", peer, f"{_fmt(b)} ({_fmt(fb)})",
                             f"**{_fmt(ratio)}×**", f"≥ {goal:g}×"])
                self.target(f"cluster: {metric} {px} / {peer} ≥ {goal:g}×", fs, _fmt(ratio, "×"),
                            None if ratio is None else ratio >= goal)
        if rows:
            self.p("Throughput in IOPS (median over the repetitions; first second in brackets):")
            self.p()
            self.table(["fs", "measure", "Parallax", "against", "its IOPS", "ratio", "target"], rows)
        rows = []
        for fs in sorted({r["fs"] for r in recs}):
            a, b = p99.get((fs, "fork-latency", "parallax")), p99.get((fs, "fork-latency", "rbd"))
            if a is not None or b is not None:
                n = max((r.get("n", 0) for r in recs if r["metric"] == "fork-latency" and r["fs"] == fs), default=0)
                rows.append([fs, "fork / clone latency (ms)", n,
                             f"{_fmt(_ms(p50.get((fs, 'fork-latency', 'parallax'))))} / {_fmt(_ms(a))}",
                             f"{_fmt(_ms(p50.get((fs, 'fork-latency', 'rbd'))))} / {_fmt(_ms(b))}",
                             f"{_fmt(_ratio(b, a))}× faster"])
                self.target("cluster: fork p99 < 5 ms (store in Ceph)", fs,
                            f"{_fmt(_ms(a))} ms (rbd clone {_fmt(_ms(b))} ms)", None if a is None else a < 5000)
        if rows:
            self.p("Fork latency, p50 / p99 in ms per call (median over the repetitions):")
            self.p()
            self.table(["fs", "measure", "calls per rep", "Parallax fork", "rbd clone", "p99 ratio"], rows)
        fo = [r for r in recs if r["metric"] == "failover"]
        for fs in sorted({r["fs"] for r in fo}):
            mine = [r for r in fo if r["fs"] == fs]
            took = val.get((fs, "failover", "parallax"))
            ttl = max(r["ttl"] for r in mine)
            ready = median([r.get("ready_s") for r in mine])
            same = all(r.get("same_data") for r in mine)
            self.p(f"Failover on {fs}: {_fmt(took)} s from SIGKILL of host A to host B's first answered read "
                   f"(median of {len(mine)}; lease TTL {ttl} s; B's daemon ready after {_fmt(ready)} s; "
                   f"{'B read the same bytes A had served' if same else '**B read other bytes than A**'}).")
            self.p()
            self.target(f"cluster: failover ≤ TTL + 1 s (TTL {ttl} s)", fs, _fmt(took, " s"),
                        None if took is None else took <= ttl + 1 and same)
        imp = [r for r in recs if r["metric"] == "import"]
        if imp:
            self.p("Loading the data: " + "; ".join(f"{r['fs']} {r['system']} {_fmt(r['value'], ' s')}"
                                                   for r in imp) + ".")
            self.p()

    def _plot(self, name, title, xlabel, ylabel, series, logx=False, logy=False):
        if not series:
            return False
        gp = [f"set terminal pngcairo size 900,560 font 'sans,10'", f"set output '{name}.png'",
              f"set title '{title}'", f"set xlabel '{xlabel}'", f"set ylabel '{ylabel}'", "set key outside below",
              "set grid"]
        if logx:
            gp.append("set logscale x 2" if name == "latency" else "set logscale x 10")
        if logy:
            gp.append("set logscale y 10")
        plots = []
        for i, (label, pts) in enumerate(sorted(series.items())):
            dat = f"{name}-{i}.dat"
            with open(os.path.join(self.out, dat), "w") as f:
                f.write(f"# {label}\n")
                for x, y in sorted(pts):
                    # depth 0 cannot sit on a log axis: it is drawn at 0.5
                    f.write(f"{x if x > 0 or not logx else 0.5} {y}\n")
            plots.append(f"'{dat}' using 1:2 with linespoints lw 2 title '{label}'")
        gp.append("plot " + ", ".join(plots))
        with open(os.path.join(self.out, f"{name}.gp"), "w") as f:
            f.write("\n".join(gp) + "\n")
        r = subprocess.run(["gnuplot", f"{name}.gp"], cwd=self.out, capture_output=True, text=True)
        if r.returncode != 0:
            self.d["notes"].append(f"gnuplot {name}: {r.stderr.strip()[-300:]}")
            return False
        return True

    def build(self):
        self.header()
        body_start = len(self.lines)
        self.nbd()
        self.cow()
        self.depth()
        self.meta()
        self.snaps()
        self.ring()
        self.memory()
        self.scale()
        self.dedup()
        self.cluster()
        body = self.lines[body_start:]
        self.lines = self.lines[:body_start]
        self.p("## Targets")
        self.p()
        self.table(["target", "fs", "measured", "status"], self.targets)
        self.lines += body
        if self.d["notes"]:
            self.p("## Notes from this run")
            self.p()
            for n in self.d["notes"]:
                self.p(f"* {n}")
            self.p()
        if os.path.exists(LIMITS):
            with open(LIMITS) as f:
                text = f.read().strip()
            self.p(re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M))  # one level down
            self.p()
        self.p("---")
        self.p("Made by `make bench` (`bench/run.py`; see `bench/README.md`). Raw records: "
               "`results.json` (every run, with the load average at its time) and `raw/` (fio's and "
               "frontend-shim's own JSON).")
        return "\n".join(self.lines) + "\n"


def write(run):
    """Writes summary.md and the plots into the run's directory, and bench/results/LATEST.md."""
    with open(os.path.join(run.out, "results.json")) as f:
        data = json.load(f)
    text = Summary(data, run.out).build()
    with open(os.path.join(run.out, "summary.md"), "w") as f:
        f.write(text)
    results = os.path.join(HERE, "results")
    if os.path.dirname(os.path.abspath(run.out)) == results and not data["settings"].get("quick"):
        rel = os.path.basename(run.out)
        linked = re.sub(r"\]\(([^)#:]+\.png)\)", rf"]({rel}/\1)", text)
        with open(os.path.join(results, "LATEST.md"), "w") as f:
            f.write(f"<!-- copy of {rel}/summary.md, written by bench/run.py -->\n{linked}")
