"""A place to benchmark: one directory on one file system holding the same data three ways —
a raw file, a qcow2 file and a Parallax store with the VDI `v` — so every server reads and
writes the same bytes on the same file system."""

import os
import shutil

from .servers import Nbdkit, NbdServer, Parallax, QemuNbd
from .util import free_bytes, fs_type, human, log, odirect_ok, sh


class Site:
    def __init__(self, run, name, root, size, parallax_bin):
        self.run = run
        self.name = name
        self.dir = os.path.join(root, f"parallax-bench-{os.getpid()}-{name}")
        self.size = size
        self.bin = parallax_bin
        os.makedirs(self.dir, exist_ok=True)
        self.fstype = fs_type(self.dir)
        self.odirect = odirect_ok(self.dir)
        self.raw = os.path.join(self.dir, "data.raw")
        self.qcow2 = os.path.join(self.dir, "data.qcow2")
        self.store = os.path.join(self.dir, "main.px")

    def describe(self):
        return {"name": self.name, "dir": self.dir, "fstype": self.fstype, "odirect": self.odirect}

    def need(self, nbytes):
        have = free_bytes(self.dir)
        if have < nbytes:
            raise RuntimeError(f"{self.dir} ({self.fstype}) has {human(have)} free; the bench needs "
                               f"{human(nbytes)} there (set a smaller --size)")

    def prepare(self, source=None):
        """Fills the raw file (random data, or a copy of `source`), converts it to qcow2 and
        imports it into a fresh Parallax store as VDI `v`."""
        self.need(4 * self.size + (1 << 30))
        if source:
            log(f"{self.name}: copying the {human(self.size)} data file")
            shutil.copyfile(source, self.raw)
        else:
            log(f"{self.name}: filling {human(self.size)} with random data")
            sh(["dd", "if=/dev/urandom", f"of={self.raw}", "bs=1M", f"count={self.size >> 20}",
                "iflag=fullblock", "status=none"])
        log(f"{self.name}: qcow2 copy and Parallax import")
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", self.raw, self.qcow2])
        sh([self.bin, "--store", self.store, "init", "--size", f"{max(6 * self.size, 4 << 30) >> 20}M"])
        sh([self.bin, "--store", self.store, "vdi", "import", "v", self.raw])
        sh(["sync"])

    def parallax(self, label="parallax", store=None, export="v", config_extra=""):
        return Parallax(label, self.bin, store or self.store, self.dir, export=export,
                        config_extra=config_extra)

    def qemu(self, label, path, fmt, cache, read_only=False):
        aio = "native" if cache == "none" else "threads"
        return QemuNbd(label, path, fmt, cache, aio, self.dir, read_only=read_only)

    def peers(self):
        """Every server of the NBD comparison, Parallax first. The cache=none (O_DIRECT) peers
        are left out where the file system refuses O_DIRECT."""
        s = [self.parallax(),
             self.qemu("qemu-nbd raw writeback", self.raw, "raw", "writeback"),
             self.qemu("qemu-nbd qcow2 writeback", self.qcow2, "qcow2", "writeback")]
        if self.odirect:
            s += [self.qemu("qemu-nbd raw none/native", self.raw, "raw", "none"),
                  self.qemu("qemu-nbd qcow2 none/native", self.qcow2, "qcow2", "none")]
        s += [Nbdkit("nbdkit file", self.raw, self.dir), NbdServer("nbd-server", self.raw, self.dir)]
        return s

    def release_data_copies(self):
        """Deletes the qcow2 file and the main store once no section needs them (the raw file
        stays: it may be the next site's source). On tmpfs they are memory: a 12 GiB store that
        the first sections have written all over, with the sections after them, once filled a
        24 GiB machine and the kernel killed a daemon."""
        for path in (self.qcow2, self.store):
            if os.path.exists(path):
                os.unlink(path)

    def cleanup(self, keep=()):
        """Removes the work directory, or everything in it but the paths in `keep`. The
        servers' logs are kept first, in the run's `raw/logs-<site>/`."""
        self.save_logs()
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for entry in os.listdir(self.dir):
            p = os.path.join(self.dir, entry)
            if p not in keep:
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)

    def save_logs(self):
        """Copies the servers' logs (`*.log` in the work directory) into the raw results."""
        if not os.path.isdir(self.dir):
            return
        logs = [e for e in os.listdir(self.dir) if e.endswith(".log")]
        if not logs:
            return
        dest = os.path.join(self.run.raw_dir, f"logs-{self.name}")
        os.makedirs(dest, exist_ok=True)
        for e in logs:
            shutil.copyfile(os.path.join(self.dir, e), os.path.join(dest, e))
