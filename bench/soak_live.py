"""Live soak: `capture live` for a long time with all four streams on, a looped video for the camera.

The real command runs in this process (`capture.cli.main(["live", ...])`) with
its camera replaced by a video played in a loop at its own rate, as a webcam
delivers frames (the clock starts when capture starts reading). At regular
times the picture goes black for a while, as if the performer stepped out of
view, and then the face comes back. The four streams go to receivers this
script opens on loopback and drains on threads, counting what arrives: UDP
sockets for vmc://, vrchat:// and livelink://, a WebSocket client for ws://.
Nothing is written to disk (no --out): the long-running use is streaming.

Measured:

- latency per frame, from the frame leaving the camera (Frame.captured_s) to
  its result reaching the streams ("blendshapes out") and to the last of the
  four streams having sent it ("sent"), and each stream's own figure;
  median, p95, p99 in ms, against two frame intervals;
- resident memory (VmRSS) sampled over the run; the growth is the median of
  the last half-minute's samples over the median of the samples in the second
  half of the first minute (warm-up: the identity locks, the automatic neutral
  freezes after 10 s), in %; also a straight-line slope over the samples after
  the first minute, MB per hour;
- tracking recovery: for each return of the face, the time from the first
  frame showing it again leaving the camera to the first frame with a face
  sent to the streams (median, max; frames missed on the way), and runs that
  never found the face before the next blank-out;
- frames/s processed, stale frames dropped, frames with a face while the face
  was shown and on blank frames, and per stream the frames capture sent and
  the packets (datagrams, WebSocket messages) the receivers got;
- the 1-minute load average over the run (the machine may be shared).

A JSON report (`--json`, default runs/soak_live.json) keeps every figure and
the memory and load samples.

    .venv/bin/python bench/soak_live.py                 # 30 minutes
    .venv/bin/python bench/soak_live.py --minutes 5
    .venv/bin/python bench/soak_live.py --short         # 6 s, a quick check
    .venv/bin/python bench/soak_live.py --short -- --blink lids   # after --: more `capture live` options
"""
from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the capture command sets them

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import capture.pipeline as pipeline  # noqa: E402
import capture.sources as sources  # noqa: E402
import capture.streams as streams  # noqa: E402
from capture import cli  # noqa: E402

VIDEO = REPO.parent / "shared" / "data" / "videos" / "d10.mp4"
UDP_SCHEMES = ("vmc", "vrchat", "livelink")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident memory (VmRSS), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


class AwaySchedule:
    """When the face is out of view: the last away_s seconds of every every_s seconds of camera time."""

    def __init__(self, every_s: float, away_s: float):
        if not 0 < away_s < every_s:
            raise SystemExit(f"soak: need 0 < --away-s ({away_s}) < --away-every-s ({every_s})")
        self.every_s, self.away_s = every_s, away_s

    def shown(self, time_s: float) -> bool:
        return (time_s % self.every_s) < self.every_s - self.away_s


class FrameLog:
    """Per camera frame, preallocated (and touched) up front so that the log itself never grows
    the process's memory: when it left the camera, whether the face was in the picture, and,
    for frames capture processed, when the result reached the streams and when all were sent."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.captured_s = np.full(capacity, np.nan)
        self.ready_s = np.full(capacity, np.nan)
        self.sent_s = np.full(capacity, np.nan)
        self.shown = np.zeros(capacity, dtype=np.int8)
        self.face = np.full(capacity, -1, dtype=np.int8)  # -1 not processed (dropped), 0 no face, 1 face
        self.released = 0  # frames the camera gave out


class LoopedCamera(sources.FrameSource):
    """A video played in a loop as a live camera until a duration has passed.

    Frame k leaves at start + k / fps on one clock (a slow decode never makes later frames
    late); during the away schedule's blank-outs the picture is black, its size unchanged.
    Built by `capture live` in place of CameraSource (see make_camera)."""

    def __init__(self, video: Path, duration_s: float, away: AwaySchedule, log: FrameLog):
        self.video = sources.VideoSource(video)
        self.live = True
        self.fps = self.video.fps or 30.0
        self.size = self.video.size
        self.frame_count = None
        self.duration_s, self.away, self.log = duration_s, away, log
        self.loops = 0

    def __iter__(self):
        start = time.perf_counter()
        k = 0
        while True:
            for frame in self.video:
                time_s = k / self.fps
                if time_s >= self.duration_s or k >= self.log.capacity:
                    return
                delay = start + time_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                shown = self.away.shown(time_s)
                image = frame.image if shown else np.zeros_like(frame.image)
                out = sources.Frame(k, time_s, image, "", frame.decode_s)
                out.captured_s = time.perf_counter()
                self.log.captured_s[k] = out.captured_s
                self.log.shown[k] = shown
                self.log.released = k + 1
                k += 1
                yield out
            self.loops += 1

    def close(self) -> None:
        self.video.close()


class Receivers:
    """UDP sockets for the three UDP protocols, drained on one thread, and a WebSocket client
    (started once capture's server is up): packets and bytes counted per stream."""

    def __init__(self):
        self.sockets = {}
        for scheme in UDP_SCHEMES:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.sockets[scheme] = sock
        self.packets = {scheme: 0 for scheme in (*UDP_SCHEMES, "ws")}
        self.bytes = dict.fromkeys(self.packets, 0)
        self.ws_connects = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._drain_udp, name="soak-udp", daemon=True)]
        self._threads[0].start()

    def port(self, scheme: str) -> int:
        return self.sockets[scheme].getsockname()[1]

    def _drain_udp(self) -> None:
        selector = selectors.DefaultSelector()
        for scheme, sock in self.sockets.items():
            selector.register(sock, selectors.EVENT_READ, scheme)
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.2):
                while True:
                    try:
                        data = key.fileobj.recv(65536)
                    except (BlockingIOError, OSError):
                        break
                    self.packets[key.data] += 1
                    self.bytes[key.data] += len(data)
        selector.close()

    def start_ws(self, port: int) -> None:
        thread = threading.Thread(target=self._read_ws, args=(port,), name="soak-ws", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read_ws(self, port: int) -> None:
        from websockets.sync.client import connect

        while not self._stop.is_set():  # reconnects if the connection drops (counted)
            try:
                with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=2) as client:
                    self.ws_connects += 1
                    while not self._stop.is_set():
                        try:
                            message = client.recv(timeout=0.2)
                        except TimeoutError:
                            continue
                        self.packets["ws"] += 1
                        self.bytes["ws"] += len(message)
            except Exception:  # noqa: BLE001 - the server is gone (end of the run) or not up yet
                time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self.sockets.values():
            sock.close()


class Sampler:
    """Resident memory and the 1-minute load average every period_s, on a thread, into
    preallocated arrays; prints a progress line every report_s when report_s is set."""

    def __init__(self, period_s: float, duration_s: float, log: FrameLog, report_s: float | None):
        n = int(duration_s / period_s) + 600
        self.t_s = np.full(n, np.nan)
        self.rss = np.full(n, np.nan)
        self.load1 = np.full(n, np.nan)
        self.n = 0
        self.period_s, self.log, self.report_s = period_s, log, report_s
        self._stop = threading.Event()
        self.start_s = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_report = self.report_s
        while self.n < len(self.t_s):
            t = time.perf_counter() - self.start_s
            self.t_s[self.n], self.rss[self.n], self.load1[self.n] = t, rss_bytes(), os.getloadavg()[0]
            self.n += 1
            if next_report is not None and t >= next_report:
                next_report += self.report_s
                done = int(np.count_nonzero(self.log.face >= 0))
                print(f"soak: {t / 60:5.1f} min  {self.log.released} frames from the camera, {done} processed, "
                      f"RSS {self.rss[self.n - 1] / 2**20:.1f} MiB, load {self.load1[self.n - 1]:.2f}",
                      file=sys.stderr, flush=True)
            if self._stop.wait(self.period_s):
                break

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        t = time.perf_counter() - self.start_s  # one last sample
        if self.n < len(self.t_s):
            self.t_s[self.n], self.rss[self.n], self.load1[self.n] = t, rss_bytes(), os.getloadavg()[0]
            self.n += 1


def percentiles_ms(values_s) -> dict:
    a = np.asarray(values_s, dtype=np.float64)
    a = a[np.isfinite(a)] * 1e3
    if not len(a):
        return {"n": 0, "median": None, "p95": None, "p99": None, "max": None}
    return {"n": int(len(a)), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def recoveries(log: FrameLog) -> dict:
    """Each return of the face: from its first shown frame leaving the camera to the first frame
    with a face sent to the streams, before the face goes away again."""
    n = log.released
    shown = log.shown[:n].astype(bool)
    returns = np.flatnonzero(shown[1:] & ~shown[:-1]) + 1
    times_s, missed, lost = [], [], 0
    for r in returns:
        end = r
        while end < n and shown[end]:
            end += 1
        found = np.flatnonzero(log.face[r:end] == 1)
        if end == n and not len(found) and end - r < 30:
            continue  # the run ended right after the return: not a failure
        if not len(found):
            lost += 1
            continue
        k = r + found[0]
        times_s.append(log.sent_s[k] - log.captured_s[r])
        missed.append(int(found[0]))
    stats = percentiles_ms(times_s)
    return {"returns": int(len(times_s) + lost), "found": len(times_s), "never_found": lost,
            "median_ms": stats["median"], "max_ms": stats["max"], "p95_ms": stats["p95"],
            "frames_missed_median": float(np.median(missed)) if missed else None,
            "frames_missed_max": int(max(missed)) if missed else None,
            "times_ms": [round(t * 1e3, 2) for t in times_s]}


def memory(sampler: Sampler, duration_s: float) -> dict:
    t, rss = sampler.t_s[:sampler.n], sampler.rss[:sampler.n]
    warm_s = min(60.0, duration_s / 3)  # "the first minute"; a third of a short run
    first = rss[(t >= warm_s / 2) & (t <= warm_s)]
    last = rss[t >= t[-1] - warm_s / 2]
    first_mb = float(np.median(first)) / 2**20 if len(first) else float("nan")
    end_mb = float(np.median(last)) / 2**20
    after = t >= warm_s
    slope = float(np.polyfit(t[after] / 3600, rss[after] / 2**20, 1)[0]) if after.sum() >= 3 else float("nan")
    return {"warmup_s": warm_s, "first_minute_mb": first_mb, "end_mb": end_mb,
            "growth_pct": 100 * (end_mb - first_mb) / first_mb, "slope_mb_per_hour": slope,
            "min_mb": float(rss.min()) / 2**20, "max_mb": float(rss.max()) / 2**20, "samples": int(sampler.n)}


def per_frame_lists(summary, hub) -> dict:
    """What capture itself keeps per frame at the end (its stage timings, each stream's latencies,
    the frames without a face; a live take's last 9000 frames): entries and their approximate
    size (an 8-byte slot and a float or int object, 32 bytes in Python's allocator, each), to
    tell them apart from other growth."""
    lists = {"TakeSummary.timings_s": sum(len(v) for v in summary.timings_s.values()),
             "TakeSummary.frames_without_face": len(summary.frames_without_face),
             "Stream.latency_s": sum(len(s.latency_s) for s in hub.streams)}
    return {"entries": lists, "approx_mb": sum(lists.values()) * (8 + 32) / 2**20}


def git_state() -> dict:
    def git(*argv):
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--untracked-files=all", "capture", "engine").splitlines()}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long capture runs (default 30)")
    ap.add_argument("--short", action="store_true",
                    help="a quick check: 6 s, the face away for 0.8 s in every 2.5 s, memory sampled often")
    ap.add_argument("--video", type=Path, default=VIDEO, help="the video looped as the camera (default d10.mp4)")
    ap.add_argument("--away-every-s", type=float, default=20.0, help="the face leaves once in this many s (20)")
    ap.add_argument("--away-s", type=float, default=2.0, help="for this many s (2)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="memory sampled every this many s (5)")
    ap.add_argument("--json", type=Path, default=REPO / "runs" / "soak_live.json", help="the report")
    args = ap.parse_args(argv)
    if args.short:
        args.minutes, args.away_every_s, args.away_s, args.sample_s = 6 / 60, 2.5, 0.8, 0.2
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        raise SystemExit(f"soak: --minutes must be > 0, got {args.minutes}")
    duration_s = args.minutes * 60
    away = AwaySchedule(args.away_every_s, args.away_s)

    probe = sources.VideoSource(args.video)
    fps = probe.fps or 30.0
    probe.close()
    log = FrameLog(int(duration_s * fps) + 2)
    receivers = Receivers()
    started = {}

    class SoakHub(streams.StreamHub):
        """capture's own hub, noting when each result reached it and when all streams had sent it."""

        def __init__(self, stream_list, max_fps=None):
            super().__init__(stream_list, max_fps)
            started["hub"] = self
            ws = next(s for s in stream_list if s.scheme == "ws")
            receivers.start_ws(ws.port)

        def send(self, frame):
            ready = time.perf_counter()
            went = super().send(frame)
            if 0 <= frame.index < log.capacity:
                log.ready_s[frame.index] = ready
                log.sent_s[frame.index] = time.perf_counter()
                log.face[frame.index] = frame.face_found
            return went

    real_run_take = pipeline.run_take

    def run_take(source, capture, *a, **kw):
        started["settings"] = capture.settings
        started["summary"] = summary = real_run_take(source, capture, *a, **kw)
        return summary

    def make_camera(index, width=None, height=None, fps=None):
        started["camera"] = camera = LoopedCamera(args.video, duration_s, away, log)
        return camera

    load_before = os.getloadavg()
    git = git_state()  # the code as it was when the run started
    sampler = Sampler(args.sample_s, duration_s + 120, log, None if args.short else 60.0)
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    command = ["live", "--camera", "0", "--quiet",
               *(f"--stream={s}://127.0.0.1:{receivers.port(s)}" for s in UDP_SCHEMES),
               "--stream=ws://127.0.0.1:0", *extra]
    print(f"soak: capture {' '.join(command)}  ({duration_s / 60:g} min, {args.video.name} looped, the face "
          f"away {away.away_s:g} s in every {away.every_s:g} s)", file=sys.stderr, flush=True)
    saved = sources.CameraSource, streams.StreamHub, pipeline.run_take
    sources.CameraSource, streams.StreamHub, pipeline.run_take = make_camera, SoakHub, run_take
    try:
        status = cli.main(command)
    finally:
        sources.CameraSource, streams.StreamHub, pipeline.run_take = saved
    wall_s = time.perf_counter() - wall0
    cpu_s = time.process_time() - cpu0
    time.sleep(0.3)  # the last datagrams
    receivers.close()
    sampler.close()
    if status != 0 or "summary" not in started:
        print(f"soak: capture live ended with status {status}", file=sys.stderr)
        return 1

    summary, hub, camera = started["summary"], started["hub"], started["camera"]
    n = log.released
    processed = log.face[:n] >= 0
    shown = log.shown[:n].astype(bool)
    interval_ms = 1e3 / fps
    result = {
        "command": "capture " + " ".join(command),
        "video": str(args.video), "video_fps": fps, "loops": camera.loops,
        "minutes": args.minutes, "wall_s": wall_s, "cpu_s": cpu_s, "cores": os.cpu_count(),
        "away": {"every_s": away.every_s, "away_s": away.away_s},
        "blink": getattr(started["settings"], "blink", None), "engine": started["settings"].engine,
        "git": git,
        "frames": {"from_camera": int(n), "processed": int(processed.sum()), "dropped_stale": int(summary.dropped),
                   "processed_per_s": float(processed.sum() / summary.wall_s),
                   "camera_per_s": float(n / summary.wall_s),
                   "face_while_shown_pct": float(100 * np.mean(log.face[:n][processed & shown] == 1)),
                   "face_on_blank_frames": int(np.sum(log.face[:n][processed & ~shown] == 1))},
        "latency_ms": {"frame_interval": interval_ms,
                       "blendshapes_out": percentiles_ms(log.ready_s[:n] - log.captured_s[:n]),
                       "all_streams_sent": percentiles_ms(log.sent_s[:n] - log.captured_s[:n]),
                       "per_stream_sent": {s.scheme: percentiles_ms(s.latency_s) for s in hub.streams}},
        "memory": memory(sampler, duration_s) | {"capture_per_frame_lists": per_frame_lists(summary, hub)},
        "recovery": recoveries(log),
        "streams": {s.scheme: {"url": s.url, "frames_offered": s.offered, "frames_sent": s.sent,
                               "packets_received": receivers.packets[s.scheme],
                               "bytes_received": receivers.bytes[s.scheme]} for s in hub.streams},
        "ws_connections": receivers.ws_connects,
        "load_average_1min": {"before": load_before[0], "median": float(np.nanmedian(sampler.load1[:sampler.n])),
                              "max": float(np.nanmax(sampler.load1[:sampler.n])), "after": os.getloadavg()[0]},
        "samples": {"t_s": [round(float(v), 2) for v in sampler.t_s[:sampler.n]],
                    "rss_mb": [round(float(v) / 2**20, 2) for v in sampler.rss[:sampler.n]],
                    "load1": [round(float(v), 2) for v in sampler.load1[:sampler.n]]},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print_report(result)
    print(f"report: {args.json}", flush=True)
    return 0


def print_report(r: dict) -> None:
    f, lat, mem, rec = r["frames"], r["latency_ms"], r["memory"], r["recovery"]
    load = r["load_average_1min"]
    print(f"{r['wall_s'] / 60:.1f} min of `capture live` ({r['engine']} engine, blink from {r['blink']}) on "
          f"{Path(r['video']).name} looped {r['loops']} times at {r['video_fps']:g} frames/s, all four streams on; "
          f"{r['cores']} cores, load average {load['median']:.2f} median ({load['before']:.2f} before, "
          f"max {load['max']:.2f}); CPU {r['cpu_s'] / r['wall_s']:.2f} cores")
    print(f"frames: {f['from_camera']} from the camera, {f['processed']} processed ({f['processed_per_s']:.1f} "
          f"frames/s), {f['dropped_stale']} stale dropped; a face on {f['face_while_shown_pct']:.1f}% of processed "
          f"frames showing it, on {f['face_on_blank_frames']} blank frames")
    print(f"{'latency, ms (frame leaves the camera ->)':<44}{'median':>8}{'p95':>8}{'p99':>8}{'max':>8}")

    def row(name, s):
        cells = "".join(f"{s[k]:>8.2f}" if s[k] is not None else f"{'-':>8}" for k in ("median", "p95", "p99", "max"))
        print(f"{name:<44}{cells}")
    row("blendshapes out (result at the streams)", lat["blendshapes_out"])
    row("sent on all four streams", lat["all_streams_sent"])
    for scheme, s in lat["per_stream_sent"].items():
        row(f"  {scheme} sent", s)
    p99 = lat["all_streams_sent"]["p99"]
    if p99 is not None:
        print(f"p99 {p99:.1f} ms against two frame intervals, {2 * lat['frame_interval']:.1f} ms: "
              f"{'within' if p99 <= 2 * lat['frame_interval'] else 'OVER'}")
    print(f"memory (RSS): {mem['first_minute_mb']:.1f} MiB after the first {mem['warmup_s']:g} s -> "
          f"{mem['end_mb']:.1f} MiB at the end: {mem['growth_pct']:+.2f}% (flat: <= 5%); slope after warm-up "
          f"{mem['slope_mb_per_hour']:+.1f} MiB/h; {mem['samples']} samples, "
          f"{mem['min_mb']:.1f}-{mem['max_mb']:.1f} MiB")
    lists = mem["capture_per_frame_lists"]
    print(f"  of which capture's per-frame records at the end: about {lists['approx_mb']:.1f} MiB, "
          + ", ".join(f"{k} {v}" for k, v in lists["entries"].items()))
    if rec["found"]:
        print(f"recovery after the face returns ({rec['found']} of {rec['returns']} returns found, "
              f"{rec['never_found']} never): median {rec['median_ms']:.1f} ms, max {rec['max_ms']:.1f} ms "
              f"(target <= 200 ms); frames missed median {rec['frames_missed_median']:g}, "
              f"max {rec['frames_missed_max']}")
    else:
        print(f"recovery: no return of the face was found ({rec['returns']} returns)")
    print("per stream: " + "; ".join(f"{k}: {v['frames_sent']} of {v['frames_offered']} frames sent, "
                                     f"{v['packets_received']} packets received" for k, v in r["streams"].items()))


if __name__ == "__main__":
    raise SystemExit(main())
