"""Keep the terminal readable: MediaPipe's native libraries (TFLite, absl) print
start-up chatter straight to file descriptor 2, past Python. The CLI routes fd 2
through a pipe and drops those known lines; everything else passes unchanged.

And survive the terminal going away: a standard stream closed before start
(`2>&-`) is reopened on /dev/null, so that no output file is given its
descriptor; a pipe whose reader left (`| head`) is silenced once noticed."""
from __future__ import annotations

import os
import re
import sys
import threading

# whole chatter lines, wherever they start (a progress bar may be mid-line)
CHATTER = re.compile(
    rb"(INFO: Created TensorFlow Lite|WARNING: All log messages before absl::InitializeLog"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\])[^\n]*\n")
# the start of a chatter line whose end has not arrived yet
PARTIAL = re.compile(rb"(INFO: |WARNING: |[IWE]\d{4} )[^\n]*$")


class NativeStderrFilter:
    """Context manager: while active, lines written to fd 2 that match CHATTER are dropped."""

    def __init__(self, pattern: re.Pattern = CHATTER):
        self.pattern = pattern
        self._thread: threading.Thread | None = None

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return self
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), daemon=True)
        self._thread.start()
        return self

    def _pump(self, read_fd: int) -> None:
        """Copies the pipe to the real stderr. If that fails (its reader left), the pipe is
        closed, so the next write to fd 2 fails in the writer's own thread (BrokenPipeError)."""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            pending = b""
            try:
                while chunk := pipe.read(65536):
                    pending = self.pattern.sub(b"", pending + chunk)
                    partial = PARTIAL.search(pending)
                    cut = partial.start() if partial else len(pending)
                    if cut:
                        _write_all(self._saved, pending[:cut])
                    pending = pending[cut:]
                if pending:
                    _write_all(self._saved, pending)
            except OSError:
                return

    def __exit__(self, *exc):
        if self._thread is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the pump sees EOF
        self._thread.join(timeout=2.0)
        os.close(self._saved)
        self._thread = None


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def reopen_closed_std_streams() -> None:
    """Puts /dev/null on any of descriptors 0, 1, 2 that is closed, and gives Python a
    sys.stdout/sys.stderr where it has none: otherwise the first file opened would get
    descriptor 2 and native libraries' messages would land in it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def silence_std_streams() -> None:
    """After a broken pipe on stdout or stderr: sends both to /dev/null, so that nothing
    more fails, not even Python's flush at exit."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(null, stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass
    os.close(null)
