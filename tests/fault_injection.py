"""A full disk without a small file system to fill: writes into one folder fail as they
would on a device with `capacity_bytes`, for tests of what capture does when space runs out.

Usage is the real size of the files under the folder, so removing files frees room, as on a
real device. The write that crosses the line is cut short, the next fails with ENOSPC, as
the kernel does. It covers the calls the writers make: os.write, os.writev and os.pwrite
(meshes, track.npz, the lock file) and files opened with open() in capture.sinks (the CSV)
and any other module named.
"""
from __future__ import annotations

import errno
import io
import os
import subprocess


class FullDisk:
    def __init__(self, root, capacity_bytes: int):
        self.root = os.path.realpath(root)
        self.capacity_bytes = int(capacity_bytes)
        self.failures = 0
        self._write, self._writev, self._pwrite = os.write, os.writev, os.pwrite

    def install(self, monkeypatch, *modules) -> "FullDisk":
        """Patches os's writes, and open() in capture.sinks and the other modules given."""
        import capture.sinks

        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "writev", self.writev)
        monkeypatch.setattr(os, "pwrite", self.pwrite)
        for module in (capture.sinks, *modules):
            monkeypatch.setattr(module, "open", self.open, raising=False)
        return self

    def used(self) -> int:
        """Bytes under root. Another thread (the mesh writer) may rename or remove a file between the
        listing and its lstat: such a file is counted under its new name or not at all, never an error
        a real disk would not give."""
        total = 0
        for d, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(d, f)).st_size
                except FileNotFoundError:
                    pass
        return total

    def _inside(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root + os.sep)
        except OSError:
            return False

    def _room(self, fd: int, wanted: int) -> int:
        """Bytes fd may write now; raises ENOSPC when there is none."""
        if not self._inside(fd):
            return wanted
        room = self.capacity_bytes - self.used()
        if room <= 0 and wanted > 0:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return min(wanted, room)

    def write(self, fd, data):
        data = memoryview(data).cast("B")
        return self._write(fd, data[: self._room(fd, data.nbytes)])

    def writev(self, fd, buffers):
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        return self._write(fd, data[: self._room(fd, len(data))])

    def pwrite(self, fd, data, offset):
        data = memoryview(data).cast("B")
        return self._pwrite(fd, data[: self._room(fd, data.nbytes)], offset)

    def open(self, file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True):
        if not any(m in mode for m in "wax+"):
            return open(file, mode, buffering, encoding, errors, newline, closefd)
        raw = _LimitedRaw(io.FileIO(file, mode.replace("b", "").replace("t", "")), self)
        buffered = io.BufferedWriter(raw)
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding, errors, newline)


class _LimitedRaw(io.RawIOBase):
    """A FileIO whose writes go through the disk's room check."""

    def __init__(self, raw: io.FileIO, disk: FullDisk):
        self._raw, self._disk = raw, disk

    def writable(self):
        return True

    def fileno(self):
        return self._raw.fileno()

    def write(self, data):
        data = memoryview(data).cast("B")
        return self._raw.write(data[: self._disk._room(self._raw.fileno(), data.nbytes)])

    def close(self):
        self._raw.close()
        super().close()


def read_only_folder(path):
    """path made read-only for this process: chmod, or for root (whom modes do not stop)
    the immutable attribute; None where neither is possible."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        return None
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
