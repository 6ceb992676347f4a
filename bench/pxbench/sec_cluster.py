"""Section 9: a store in Ceph (`--store rados:POOL/NAME`) against RBD on the same throwaway
cluster (scripts/cluster.sh: one mon, one memstore OSD, one etcd member, all on this machine).

Both hold the same data: a 1 GiB image whose first `cluster_data` bytes are random (the head of
the site's raw file), the rest unallocated. Memstore keeps everything in RAM and the script caps
the OSD at 512 MiB, so every fio job stays inside that data region (`--size`) and the clones
that copy data up are deleted after each run. Per repetition, in a rotating order:

1. `fork-write`: 4K random writes (QD16) on a fresh fork of a snapshot of the VDI, against a
   fresh RBD clone of a protected snapshot of the image (qemu-nbd, rbd driver, writeback): the
   clone's first write to each 4 MiB object copies the object up.
2. `vdi-write`: 4K random writes (QD16) on the VDI itself against the RBD image.
3. `warm-read`: 4K random reads (QD16) from the store in Ceph with a warm local cache (the data
   region read once first), against the same data in a local-file store on the site's file
   system (read once first as well).
4. `failover`: a daemon for host A (lease TTL `cluster_ttl` s) is killed with SIGKILL; the time
   from the kill until host B's daemon, started at once on the same store, answers a 4K NBD read.
5. `fork-latency`: forks of one snapshot through the control socket (connect to reply), against
   `rbd clone` of a protected snapshot, each timed as one CLI call (process start included: that
   is what a clone costs a script)."""

import os
import shutil
import signal
import time

from . import fio, nbd
from .servers import HOST, Parallax, QemuNbd, ServerError
from .util import human, log, quantile, rotate, sh

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_SH = os.path.join(REPO, "scripts", "cluster.sh")
STORE = "bench"  # rados:<pool>/bench
IMAGE = "img"  # the RBD image


class Cluster:
    """One scripts/cluster.sh cluster under `dir`; its logs go to `log_dest` when it stops."""

    def __init__(self, dir, log_dest):
        self.dir, self.log_dest = dir, log_dest
        self.env = {}

    def start(self):
        # 6 GiB of RAM for the OSD: the data, RBD's copy-ups, and the Parallax store's high-water
        # mark (its objects are rewritten in place, never removed; 2 GiB filled up in a run).
        env = dict(os.environ, CLUSTER_OSD_BYTES=str(6 << 30))
        sh(["bash", CLUSTER_SH, "start", self.dir, "--osds", "1"], timeout=120, env=env)
        with open(os.path.join(self.dir, "env")) as f:
            self.env = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return self

    def stop(self):
        src = os.path.join(self.dir, "log")
        if os.path.isdir(src):
            shutil.copytree(src, self.log_dest, dirs_exist_ok=True)
        sh(["bash", CLUSTER_SH, "stop", self.dir], check=False, timeout=120)

    @property
    def conf(self):
        return self.env["CEPH_CONF"]

    @property
    def pool(self):
        return self.env["PX_POOL"]

    def rbd(self, *args, timeout=120):
        return sh(["rbd", "-c", self.conf, *args], capture=True, timeout=timeout)

    def rbd_uri(self, image):
        return f"rbd:{self.pool}/{image}:conf={self.conf}"


class Bench:
    def __init__(self, run, site, cfg, cluster):
        self.run, self.site, self.cfg, self.cl = run, site, cfg, cluster
        self.data = cfg.cluster_data
        self.store = f"rados:{cluster.pool}/{STORE}"
        self.cache = {h: os.path.join(site.dir, f"cluster-cache-{h}") for h in ("a", "b")}
        self.local = os.path.join(site.dir, "cluster-local.px")

    def env(self, host="a", ttl=None):
        e = dict(os.environ)
        e.update(PARALLAX_CEPH_CONF=self.cl.conf, PARALLAX_ETCD=self.cl.env["ETCD_ENDPOINTS"],
                 PARALLAX_HOST=f"bench-{host}", PARALLAX_CACHE_DIR=self.cache[host],
                 PARALLAX_CACHE_SIZE=str(self.cfg.cluster_cache >> 20) + "M",
                 PARALLAX_LEASE_TTL=str(ttl or self.cfg.cluster_ttl))
        return e

    def px_cli(self, *args, store=None, host="a"):
        return sh([self.site.bin, "--store", store or self.store, *args], env=self.env(host), capture=True,
                  timeout=600)

    def daemon(self, host="a", label="parallax rados", log_name=None):
        return _px(self.site, label, self.store, self.env(host), log_name or f"parallax-cluster-{host}.log")

    def local_daemon(self):
        return _px(self.site, "parallax local", self.local, None, "parallax-cluster-local.log")

    def rbd_server(self, image):
        return QemuNbd("rbd " + image, self.cl.rbd_uri(image), "raw", "writeback", "threads", self.site.dir)

    def prepare(self):
        """The data file (the head of the site's raw file, then a hole up to the VDI size), the
        Parallax store in Ceph with VDI `v`, the RBD image `img`, and a local-file store with `v`."""
        size = self.cfg.cluster_vdi
        path = os.path.join(self.site.dir, "cluster-data.raw")
        with open(self.site.raw, "rb") as src, open(path, "wb") as dst:
            left = self.data
            while left:
                buf = src.read(min(left, 1 << 20))
                if not buf:
                    raise RuntimeError(f"{self.site.raw} is shorter than {human(self.data)}")
                dst.write(buf)
                left -= len(buf)
            dst.truncate(size)
        log(f"cluster: importing {human(self.data)} of data (in a {human(size)} image) into Parallax and RBD")
        t = time.monotonic()
        self.px_cli("init", "--size", "4G")
        self.px_cli("vdi", "import", "v", path)
        t_px = time.monotonic() - t
        t = time.monotonic()
        self.cl.rbd("import", "--no-progress", "--image-format", "2", path, f"{self.cl.pool}/{IMAGE}")
        t_rbd = time.monotonic() - t
        sh([self.site.bin, "--store", self.local, "init", "--size", "4G"])
        sh([self.site.bin, "--store", self.local, "vdi", "import", "v", path])
        os.unlink(path)
        self.run.record("cluster", fs=self.site.name, metric="import", system="parallax rados", rep=0,
                        value=t_px)
        self.run.record("cluster", fs=self.site.name, metric="import", system="rbd", rep=0, value=t_rbd)

    # -- the measurements ------------------------------------------------------------------------

    def _fio(self, uri, rw, metric, system, rep, runtime, extra=()):
        out = os.path.join(self.run.raw_dir, f"cluster-{self.site.name}-{metric}-{system.replace(' ', '_')}-{rep}.json")
        res = fio.nbd(uri, rw, "4k", 16, 1, runtime, 0, out, size=self.data,
                      extra=["--write_iops_log=" + out[:-5], "--log_avg_msec=1000", *extra])
        first = fio.first_second(out[:-5])
        self.run.record("cluster", fs=self.site.name, metric=metric, system=system, rep=rep,
                        first_s_iops=first, **res)
        log(f"cluster {metric:10s} {system:16s} {res['iops']:9.0f} IOPS (first second {first or 0:.0f})")
        return res

    def fork_write(self, rep):
        def px():
            with self.daemon() as d:
                d.call("snapshot", vdi="v", snap=f"fw{rep}")
                d.call("fork", src=f"v@fw{rep}", new=f"fw{rep}")
                self._fio(d.uri(f"fw{rep}"), "randwrite", "fork-write", "parallax", rep, self.cfg.cow_runtime)
                d.call("flush")
                d.call("delete", name=f"fw{rep}", recursive=False)
                d.call("delete", name=f"v@fw{rep}", recursive=False)
                d.call("flush")

        def rbd():
            snap, clone = f"{self.cl.pool}/{IMAGE}@fw{rep}", f"fwclone{rep}"
            self.cl.rbd("snap", "create", snap)
            self.cl.rbd("snap", "protect", snap)
            self.cl.rbd("clone", snap, f"{self.cl.pool}/{clone}")
            try:
                with self.rbd_server(clone) as q:
                    self._fio(q.uri(), "randwrite", "fork-write", "rbd", rep, self.cfg.cow_runtime)
            finally:
                self.cl.rbd("rm", "--no-progress", f"{self.cl.pool}/{clone}")
                self.cl.rbd("snap", "unprotect", snap)
                self.cl.rbd("snap", "rm", "--no-progress", snap)

        for f in rotate([px, rbd], rep):
            f()

    def vdi_write(self, rep):
        # Without flushes, and with one after every 32 writes (what a guest's journal does, and
        # what takes librbd's cache out of write-through).
        def px():
            with self.daemon() as d:
                self._fio(d.uri("v"), "randwrite", "vdi-write", "parallax", rep, self.cfg.runtime)
                self._fio(d.uri("v"), "randwrite", "vdi-write-flush", "parallax", rep, self.cfg.runtime,
                          extra=["--fsync=32"])

        def rbd():
            with self.rbd_server(IMAGE) as q:
                self._fio(q.uri(), "randwrite", "vdi-write", "rbd", rep, self.cfg.runtime)
                self._fio(q.uri(), "randwrite", "vdi-write-flush", "rbd", rep, self.cfg.runtime,
                          extra=["--fsync=32"])

        for f in rotate([px, rbd], rep):
            f()

    def warm_read(self, rep):
        def measure(server, system):
            with server as s:
                warm = os.path.join(self.run.raw_dir, f"cluster-{self.site.name}-warm-{system.replace(' ', '_')}-{rep}.json")
                t = time.monotonic()
                fio.nbd(s.uri("v"), "read", "1m", 8, 1, 0, 0, warm, size=self.data,
                        extra=["--time_based=0"])  # the data region once, start to end
                log(f"cluster warm-up of {system}: {human(self.data)} in {time.monotonic() - t:.1f} s")
                self._fio(s.uri("v"), "randread", "warm-read", system, rep, self.cfg.runtime)

        for f in rotate([lambda: measure(self.daemon(), "parallax rados"),
                         lambda: measure(self.local_daemon(), "parallax local")], rep):
            f()

    def fork_latency(self, rep):
        n = self.cfg.cluster_forks

        def px():
            with self.daemon() as d:
                d.call("snapshot", vdi="v", snap=f"fl{rep}")
                d.call("flush")
                lat = [d.control.timed("fork", src=f"v@fl{rep}", new=f"fl{rep}-{i}") for i in range(n)]
                self._lat("parallax", rep, lat)
                for i in range(n):
                    d.call("delete", name=f"fl{rep}-{i}", recursive=False)
                d.call("delete", name=f"v@fl{rep}", recursive=False)
                d.call("flush")

        def rbd():
            snap = f"{self.cl.pool}/{IMAGE}@fl{rep}"
            self.cl.rbd("snap", "create", snap)
            self.cl.rbd("snap", "protect", snap)
            lat = []
            for i in range(n):
                t = time.perf_counter()
                self.cl.rbd("clone", snap, f"{self.cl.pool}/fl{rep}-{i}")
                lat.append((time.perf_counter() - t) * 1e6)
            # The clones hold no data (nothing was written to them): they stay until the
            # cluster is thrown away, which saves a minute of `rbd rm`s.
            self._lat("rbd", rep, lat)

        for f in rotate([px, rbd], rep):
            f()

    def _lat(self, system, rep, lat):
        r = self.run.record("cluster", fs=self.site.name, metric="fork-latency", system=system, rep=rep,
                            n=len(lat), p50_us=quantile(lat, 0.5), p99_us=quantile(lat, 0.99), max_us=max(lat),
                            samples=[round(x, 1) for x in lat])
        log(f"cluster fork-latency {system:16s} p50 {r['p50_us'] / 1e3:.2f} ms p99 {r['p99_us'] / 1e3:.2f} ms")

    def failover(self, rep):
        """Host A serves, is killed with SIGKILL; host B's daemon starts at once (retried while
        it refuses because A's lease still holds) and is asked for a 4K read until it answers."""
        ttl = self.cfg.cluster_ttl
        a = self.daemon("a", "parallax host A", "parallax-cluster-a.log")
        a.start()
        try:
            c = nbd.Client(HOST, a.port, "v")
            want = c.read(0, 4096)
            c.close()
            a.proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            a.proc.wait()
        finally:
            a.stop()
        deadline = t0 + 10 * ttl + 30
        b, tries, ready, got = None, 0, None, None
        try:
            while time.monotonic() < deadline:
                tries += 1
                b = self.daemon("b", "parallax host B", "parallax-cluster-b.log")
                try:
                    b.start()
                    ready = time.monotonic() - t0
                    break
                except ServerError:
                    b = None
                    time.sleep(0.05)
            if b is None:
                raise RuntimeError(f"host B did not start within {deadline - t0:.0f} s; see parallax-cluster-b.log")
            while time.monotonic() < deadline:
                try:
                    c = nbd.Client(HOST, b.port, "v", timeout=5.0)
                    got = c.read(0, 4096)
                    c.close()
                    break
                except (OSError, nbd.NbdError):
                    time.sleep(0.01)
            took = time.monotonic() - t0
        finally:
            if b is not None:
                b.stop()
        if got is None:
            raise RuntimeError("host B never answered a read")
        self.run.record("cluster", fs=self.site.name, metric="failover", system="parallax", rep=rep,
                        value=took, ready_s=ready, ttl=ttl, starts=tries, same_data=got == want)
        log(f"cluster failover: {took:.2f} s from SIGKILL to a read on host B (TTL {ttl} s, B ready after "
            f"{ready:.2f} s, {tries} start(s)){'' if got == want else '; B READ OTHER DATA'}")


def _px(site, label, store, env, log_name):
    return Parallax(label, site.bin, store, site.dir, export="v", env=env, log_name=log_name)


def run(run, site, cfg):
    for tool in ("rbd", "ceph-mon", "ceph-osd", "etcd"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is missing; run scripts/deps.sh base bench")
    if " rbd" not in sh(["qemu-img", "--help"], capture=True).stdout:
        raise RuntimeError("qemu has no rbd driver; install qemu-block-extra (scripts/deps.sh bench)")
    cl = Cluster(os.path.join(site.dir, "cluster"), os.path.join(run.raw_dir, f"logs-{site.name}", "cluster"))
    cl.start()
    try:
        b = Bench(run, site, cfg, cl)
        b.prepare()
        for rep in range(cfg.reps):
            for name, fn in rotate([("fork-write", b.fork_write), ("vdi-write", b.vdi_write),
                                    ("warm-read", b.warm_read), ("fork-latency", b.fork_latency)], rep):
                try:
                    fn(rep)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # one broken measurement must not lose the others
                    run.note(f"{site.name}: cluster {name} (rep {rep}) failed: {type(e).__name__}: {e}")
            try:  # last: it leaves the store to host B
                b.failover(rep)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                run.note(f"{site.name}: cluster failover (rep {rep}) failed: {type(e).__name__}: {e}")
    finally:
        cl.stop()
        for p in (os.path.join(site.dir, "cluster-local.px"), *(os.path.join(site.dir, f"cluster-cache-{h}")
                                                                 for h in ("a", "b"))):
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.unlink(p)
