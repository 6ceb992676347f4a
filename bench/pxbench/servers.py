"""The NBD servers under test: Parallax and its peers, each started on a free port of 127.0.0.1
and stopped (SIGTERM, then SIGKILL after a grace period) by the PID this harness started."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

from . import nbd
from .util import free_port, log

HOST = "127.0.0.1"


class ServerError(Exception):
    pass


class Server:
    """Base: a process serving one export over NBD on HOST:port."""

    kind = "?"
    export = ""

    def __init__(self, label):
        self.label = label
        self.port = None
        self.proc = None
        self.log_path = None

    def uri(self, export=None):
        return f"nbd://{HOST}:{self.port}/{self.export if export is None else export}"

    def pid(self):
        return self.proc.pid if self.proc else None

    def _spawn(self, args, log_path):
        self.log_path = log_path
        logf = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [str(a) for a in args], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        logf.close()

    def _wait_ready(self, export, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"{self.label} exited ({self.proc.returncode}); see {self.log_path}")
            if nbd.probe(HOST, self.port, export):
                return
            time.sleep(0.05)
        raise ServerError(f"{self.label} not ready after {timeout}s; see {self.log_path}")

    def stop(self, timeout=180.0):
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.label} ignored SIGTERM for {timeout}s; killing it")
                p.kill()
                p.wait()
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class QemuNbd(Server):
    kind = "qemu-nbd"
    export = "x"

    def __init__(self, label, path, fmt, cache, aio, log_dir, read_only=False):
        super().__init__(label)
        self.path, self.fmt, self.cache, self.aio = path, fmt, cache, aio
        self.log_dir, self.read_only = log_dir, read_only

    def start(self):
        self.port = free_port()
        args = ["qemu-nbd", "-f", self.fmt, f"--cache={self.cache}", f"--aio={self.aio}",
                "-x", self.export, "-b", HOST, "-p", self.port, "-t", "--shared=8"]
        if self.read_only:
            args.append("-r")
        self._spawn(args + [self.path], os.path.join(self.log_dir, "qemu-nbd.log"))
        self._wait_ready(self.export)


class Nbdkit(Server):
    kind = "nbdkit"
    export = ""

    def __init__(self, label, path, log_dir):
        super().__init__(label)
        self.path, self.log_dir = path, log_dir

    def start(self):
        self.port = free_port()
        self._spawn(["nbdkit", "-f", "-i", HOST, "-p", self.port, "file", self.path],
                    os.path.join(self.log_dir, "nbdkit.log"))
        self._wait_ready(self.export)


class NbdServer(Server):
    """nbd-server forks into the background by itself (its -d mode serves one connection
    badly), so it is stopped through its PID file."""

    kind = "nbd-server"
    export = "x"

    def __init__(self, label, path, work_dir):
        super().__init__(label)
        self.path, self.work = path, work_dir
        self.daemon_pid = None

    def start(self):
        self.port = free_port()
        conf = os.path.join(self.work, "nbd-server.conf")
        pidf = os.path.join(self.work, "nbd-server.pid")
        with open(conf, "w") as f:
            f.write(f"[generic]\n    listenaddr = {HOST}\n    port = {self.port}\n    allowlist = true\n"
                    f"[{self.export}]\n    exportname = {self.path}\n")
        try:
            os.unlink(pidf)
        except FileNotFoundError:
            pass
        self._spawn(["nbd-server", "-C", conf, "-p", pidf], os.path.join(self.work, "nbd-server.log"))
        self.proc.wait(30)
        if self.proc.returncode != 0:
            raise ServerError(f"nbd-server failed ({self.proc.returncode}); see {self.log_path}")
        self.proc = None
        deadline = time.monotonic() + 10
        while self.daemon_pid is None and time.monotonic() < deadline:
            try:
                with open(pidf) as f:
                    self.daemon_pid = int(f.read().strip())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
        if self.daemon_pid is None:
            raise ServerError("nbd-server wrote no PID file")
        self._wait_ready(self.export)

    def pid(self):
        return self.daemon_pid

    def stop(self, timeout=30.0):
        if self.daemon_pid is None:
            return
        try:
            os.kill(self.daemon_pid, signal.SIGTERM)
        except ProcessLookupError:
            self.daemon_pid = None
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(self.daemon_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(self.daemon_pid, signal.SIGKILL)
        self.daemon_pid = None


class Parallax(Server):
    """`parallax serve` on one store, with its control socket for snapshots and forks."""

    kind = "parallax"

    def __init__(self, label, binary, store, work_dir, export="v", config_extra="", nbd_extra="", env=None,
                 log_name="parallax-serve.log"):
        super().__init__(label)
        self.binary, self.store, self.work = binary, store, work_dir
        # `env`: the daemon's whole environment (None: this one's), e.g. PARALLAX_CEPH_CONF and
        # the other cluster settings of a rados: store.
        self.env, self.log_name = env, log_name
        self.export = export
        self.config_extra = config_extra
        self.nbd_extra = nbd_extra
        self.control = None
        self._lines = []

    def start(self):
        self.port = free_port()
        cfg = os.path.join(self.work, "parallax-bench.ron")
        with open(cfg, "w") as f:
            f.write(f'(\n    store: "{self.store}",\n'
                    f'    nbd: (listen: ["{HOST}:{self.port}"], unix: None, {self.nbd_extra}),\n'
                    f"{self.config_extra})\n")
        self.log_path = os.path.join(self.work, self.log_name)
        self.proc = subprocess.Popen([self.binary, "serve", "--config", cfg], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        ready = threading.Event()

        def drain(out, path):
            with open(path, "ab") as logf:
                for line in out:
                    logf.write(line)
                    text = line.decode(errors="replace")
                    if text.startswith("parallax serve: ready;"):
                        self._lines.append(text)
                        ready.set()
                    logf.flush()

        threading.Thread(target=drain, args=(self.proc.stdout, self.log_path), daemon=True).start()
        deadline = time.monotonic() + 120
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"parallax serve did not start; see {self.log_path}")
        addr = self._lines[-1].rsplit("control socket ", 1)[1].strip()
        self.control = Control(addr)

    def call(self, op, **fields):
        return self.control.call(op, **fields)


class ControlError(Exception):
    pass


class Control:
    """The daemon's control socket: one JSON request line per connection, JSON lines back."""

    def __init__(self, addr):
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr

    def call(self, op, **fields):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.addr)
            s.sendall((json.dumps({"op": op, **fields}) + "\n").encode())
            f = s.makefile("rb")
            while True:
                line = f.readline()
                if not line:
                    raise ControlError(f"{op}: daemon closed the connection")
                reply = json.loads(line)
                if "progress" in reply:
                    continue
                if "error" in reply:
                    raise ControlError(f"{op}: {reply['error'].get('message', reply['error'])}")
                return reply.get("ok")
        finally:
            s.close()

    def timed(self, op, **fields):
        """Calls `op` and returns its wall-clock latency in microseconds (connect to reply)."""
        t = time.perf_counter()
        self.call(op, **fields)
        return (time.perf_counter() - t) * 1e6
