"""Streaming latency: from a frame leaving the camera to its packet sent, per protocol.

A video is played as a live camera (frames released at their own times, as a
webcam would) through the whole pipeline with all four streams open at once
(VMC, VRChat, Live Link, WebSocket), each to a receiver on loopback in this
process. For each frame and protocol:

- sent: perf_counter when the packet was handed to the socket (UDP) or
  written to the client (WebSocket), minus when the frame left the source;
- received: when the receiver read it, minus the same origin;
- the baseline, measured in the same run, is the pipeline alone: the frame
  leaving the source to its result being ready (landmarks, fit, filtering).
  sent − baseline is what streaming adds.

    python bench/bench_streaming.py [--video PATH] [--frames N]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from capture.pipeline import CaptureSettings, FaceCapture, run_take  # noqa: E402
from capture.sources import VideoSource  # noqa: E402
from capture.streams import StreamHub, open_stream  # noqa: E402
from engine.correspondence import LandmarkCorrespondence  # noqa: E402
from engine.facemodel import FaceModel  # noqa: E402

VIDEO = REPO.parent / "shared" / "data" / "videos" / "d10.mp4"


class PacedVideo(VideoSource):
    """A video released frame by frame at its own rate, like a camera."""

    def __init__(self, path):
        super().__init__(path)
        self.live = True

    def __iter__(self):
        start = time.perf_counter()
        for frame in super().__iter__():
            delay = frame.time_s - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            frame.captured_s = time.perf_counter()
            yield frame


class TimedHub(StreamHub):
    """The hub, noting when each result reached it: the pipeline-only baseline."""

    def __init__(self, streams):
        super().__init__(streams)
        self.ready_s = []
        self.captured = {}

    def send(self, frame):
        self.ready_s.append(time.perf_counter() - frame.captured_s)
        self.captured[frame.index] = frame.captured_s
        return super().send(frame)


def timed(stream):
    """Notes the time each send() of this stream takes (its own cost, the others excluded)."""
    original = stream.send
    stream.cost_s = []

    def send(frame):
        start = time.perf_counter()
        original(frame)
        stream.cost_s.append(time.perf_counter() - start)
    stream.send = send
    return stream


def udp_receiver(arrivals: list):
    """A loopback UDP socket drained on a thread; arrivals get perf_counter per datagram."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)

    def drain():
        while True:
            try:
                sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            arrivals.append(time.perf_counter())
    threading.Thread(target=drain, daemon=True).start()
    return sock


def stats_ms(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64) * 1e3
    return float(np.median(a)), float(np.percentile(a, 95))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=VIDEO)
    ap.add_argument("--frames", type=int, default=300)
    args = ap.parse_args(argv)
    from websockets.sync.client import connect

    capture = FaceCapture(FaceModel.load(), LandmarkCorrespondence.load(), CaptureSettings())
    arrivals = {name: [] for name in ("vmc", "vrchat", "livelink")}
    sockets = {name: udp_receiver(arrivals[name]) for name in arrivals}
    streams = [open_stream(f"{name}://127.0.0.1:{sock.getsockname()[1]}") for name, sock in sockets.items()]
    ws = open_stream("ws://127.0.0.1:0")
    streams.append(ws)
    ws_arrivals = []
    stop = threading.Event()
    connected = threading.Event()

    def read_ws():
        with connect(f"ws://127.0.0.1:{ws.port}/ws") as client:
            connected.set()
            while not stop.is_set():
                try:
                    message = client.recv(timeout=0.2)
                except TimeoutError:
                    continue
                except Exception:  # noqa: BLE001 - the server closed: the run is over
                    return
                ws_arrivals.append((time.perf_counter(), message))
    reader = threading.Thread(target=read_ws, daemon=True)
    reader.start()
    connected.wait(5)
    hub = TimedHub([timed(s) for s in streams])
    summary = run_take(PacedVideo(args.video), capture, None, "none", progress=False, max_frames=args.frames,
                       queue_size=1, streams=hub)
    time.sleep(0.3)
    stop.set()
    reader.join()
    hub.close()
    capture.close()
    for sock in sockets.values():
        sock.close()

    print(f"{args.video.name}: {summary.frames} frames played live at the video's rate, "
          f"{summary.faces} with a face, {summary.dropped} dropped; {os.cpu_count()} cores")
    print("Streams are sent one after another in the order below, so each 'sent' includes the streams "
          "before it;\n'send cost' is the stream's own time in send().")
    print(f"{'latency, ms':<44}{'median':>8}{'p95':>8}")
    base_med, base_p95 = stats_ms(hub.ready_s)
    print(f"{'baseline: frame out of source -> result':<44}{base_med:>8.2f}{base_p95:>8.2f}")
    import json
    for stream in streams:
        med, p95 = stats_ms(stream.latency_s)
        cost_med, cost_p95 = stats_ms(stream.cost_s)
        print(f"{stream.scheme + ': frame -> packet sent':<44}{med:>8.2f}{p95:>8.2f}"
              f"   (+{med - base_med:.2f} ms over the baseline; send cost {cost_med:.3f} / {cost_p95:.3f})")
    captured = np.array(list(hub.captured.values()))
    for name, times in arrivals.items():
        # datagrams arrive in order; VRChat sends one per parameter: take each frame's last
        per_frame = np.array(times)
        if name == "vrchat":
            if len(per_frame) % len(captured):
                continue  # frames without a face or eyes sent fewer: no per-frame split
            per_frame = per_frame.reshape(len(captured), -1)[:, -1]
        n = min(len(per_frame), len(captured))
        med, p95 = stats_ms(per_frame[:n] - captured[:n])
        print(f"{name + ': frame -> received on loopback':<44}{med:>8.2f}{p95:>8.2f}")
    ws_latency = [t - hub.captured[json.loads(m)["frame"]] for t, m in ws_arrivals]
    if ws_latency:
        med, p95 = stats_ms(ws_latency)
        print(f"{'ws: frame -> received by a client':<44}{med:>8.2f}{p95:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
