"""A minimal synchronous NBD client (fixed newstyle, NBD_OPT_GO, simple replies).

Used where fio's nbd engine does not fit: readiness probes for every server, a few scattered
writes into many VDIs, and a thousand idle-ish connections for the memory measurement.
Protocol: doc/proto.md in github.com/NetworkBlockDevice/nbd.
"""

import socket
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3


class NbdError(Exception):
    pass


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NbdError("connection closed by the server")
        buf += chunk
    return bytes(buf)


class Client:
    """One NBD connection to one export."""

    def __init__(self, host, port, export, timeout=30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.handle = 0
        self.size, self.flags = self._handshake(export)

    def _handshake(self, export):
        s = self.sock
        hello = _recv_exact(s, 18)
        if hello[:8] != NBDMAGIC or hello[8:16] != IHAVEOPT:
            raise NbdError("not a fixed-newstyle NBD server")
        (server_flags,) = struct.unpack(">H", hello[16:18])
        cflags = FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)
        s.sendall(struct.pack(">I", cflags))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(IHAVEOPT + struct.pack(">II", OPT_GO, len(data)) + data)
        size = flags = None
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", _recv_exact(s, 20))
            payload = _recv_exact(s, length)
            if magic != OPT_REPLY_MAGIC or opt != OPT_GO:
                raise NbdError("bad option reply")
            if rtype == REP_INFO and length >= 12:
                (itype,) = struct.unpack(">H", payload[:2])
                if itype == INFO_EXPORT:
                    size, flags = struct.unpack(">QH", payload[2:12])
            elif rtype == REP_ACK:
                if size is None:
                    raise NbdError("server sent no export size")
                return size, flags
            elif rtype & 0x80000000:
                raise NbdError(f"export {export!r} refused ({rtype:#x}): {payload[4:].decode(errors='replace')}")

    def _request(self, cmd, offset, length, data=b""):
        self.handle += 1
        hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.handle, offset, length)
        self.sock.sendall(hdr + data)
        magic, err, handle = struct.unpack(">IIQ", _recv_exact(self.sock, 16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise NbdError("bad reply")
        if err:
            raise NbdError(f"server error {err}")
        if cmd == CMD_READ:
            return _recv_exact(self.sock, length)
        return None

    def read(self, offset, length):
        return self._request(CMD_READ, offset, length)

    def write(self, offset, data):
        self._request(CMD_WRITE, offset, len(data), data)

    def flush(self):
        self._request(CMD_FLUSH, 0, 0)

    def close(self):
        try:
            self.handle += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self.handle, 0, 0))
        except OSError:
            pass
        self.sock.close()


def probe(host, port, export):
    """True once the server accepts a connection and serves `export`."""
    try:
        c = Client(host, port, export, timeout=5.0)
        c.close()
        return True
    except (OSError, NbdError):
        return False
