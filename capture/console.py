"""Keep the terminal readable: MediaPipe's native libraries (TFLite, absl) print
start-up chatter straight to file descriptor 2, past Python. The CLI routes fd 2
through a pipe and drops those known lines; everything else passes unchanged."""
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
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending = self.pattern.sub(b"", pending + chunk)
                partial = PARTIAL.search(pending)
                cut = partial.start() if partial else len(pending)
                if cut:
                    os.write(self._saved, pending[:cut])
                pending = pending[cut:]
            if pending:
                os.write(self._saved, pending)

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
