"""Live network streams to avatar applications: one interface over every protocol.

A `StreamFrame` is what every protocol needs of one frame; `open_stream(url)`
picks the protocol from the URL's scheme (vmc://, vrchat://, livelink://,
ws://) and `StreamHub` fans frames out to several streams at once, caps the
rate and keeps capture going whatever the receivers do. Sending never blocks:
UDP datagrams are fire-and-forget and the WebSocket server runs on its own
thread with a bounded queue per client.
"""
from __future__ import annotations

import errno
import importlib
import math
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from engine.pose import head_rotation, yaw_pitch_roll


class StreamError(Exception):
    """A stream URL or option that cannot be used; str() is one line."""


@dataclass
class StreamFrame:
    """One frame as the streams see it. Arrays are None when no face was found.

    captured_s is time.perf_counter() when the frame left its source: the
    origin of the latency figures. head_rotation (3, 3) is R_head in ARKit's
    face-anchor frame (+x the subject's left, +y up, +z out of the face, toward
    the camera when frontal), the frame engine/pose.py's yaw/pitch/roll use.
    head_position_cm (3,) is the model origin in camera coordinates (x right,
    y down, z forward). eyes_ypr_rad (2, 3): the subject's left eye, then right.
    landmarks_px (N, 2) in image pixels, image_size (width, height).
    """

    index: int
    time_s: float
    captured_s: float
    face_found: bool
    fps: float = 30.0
    blendshapes: np.ndarray | None = None
    head_rotation: np.ndarray | None = None
    head_ypr_rad: np.ndarray | None = None
    head_position_cm: np.ndarray | None = None
    eyes_ypr_rad: np.ndarray | None = None
    landmarks_px: np.ndarray | None = None
    image_size: tuple[int, int] = (0, 0)


#: Frames whose latency a stream keeps (the most recent): a long live session must not grow memory.
LATENCY_HISTORY_FRAMES = 9000


class Stream:
    """One receiver. send() must neither block nor raise because a receiver is
    absent or slow; latency_s collects (sent - captured) per frame sent, for the
    last LATENCY_HISTORY_FRAMES frames.

    offered counts the frames the hub handed over, sent those that really went
    out; send_error is the first reason a send failed (None while none has),
    which the hub reports once.
    """

    scheme = ""
    default_port = 0

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.latency_s: deque[float] = deque(maxlen=LATENCY_HISTORY_FRAMES)
        self.offered = 0
        self.sent = 0
        self.send_error: str | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def send(self, frame: StreamFrame) -> None:
        raise NotImplementedError

    def summary(self) -> str:
        """What went out, for the line printed at the end."""
        line = f"{self.url}: {self.sent} of {self.offered} frames sent"
        return line + (f" (sending failed: {self.send_error})" if self.send_error else "")

    def close(self) -> None:
        pass


class UdpStream(Stream):
    """A stream of UDP datagrams from an unconnected, non-blocking socket: a
    missing receiver costs nothing and a full send buffer drops the datagram.

    A frame counts as sent when every one of its datagrams was handed to the
    network. Datagrams the system refuses (a broadcast address, an unreachable
    network, ...) are dropped and counted, and the first reason is kept in
    send_error; a full buffer only drops (it passes).
    """

    def __init__(self, host: str, port: int):
        super().__init__(host, port)
        if not 0 < port < 65536:
            raise StreamError(f"{self.scheme}://{host}:{port}: no receiver listens on port {port}; "
                              f"give its port (1-65535), or leave it out for {self.default_port}")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise StreamError(f"cannot resolve stream host {host!r}: {exc.strerror}") from None
        family, _, _, _, self._address = infos[0]
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self.dropped = 0

    def send_datagrams(self, datagrams: list[bytes], captured_s: float) -> None:
        failed = 0
        for data in datagrams:
            try:
                self._socket.sendto(data, self._address)
            except BlockingIOError:  # send buffer full: drop this one, the next frame replaces it
                failed += 1
            except OSError as exc:
                failed += 1
                if self.send_error is None:
                    self.send_error = _send_failure(exc)
        self.dropped += failed
        if not failed:
            self.sent += 1
            self.latency_s.append(time.perf_counter() - captured_s)

    def close(self) -> None:
        self._socket.close()


def _send_failure(exc: OSError) -> str:
    """Why a datagram could not go out, in a few words."""
    why = exc.strerror or type(exc).__name__
    if exc.errno == errno.EACCES:
        why += " (a broadcast address? capture does not broadcast)"
    return why


#: scheme -> (module, class) of the protocols; imported when a URL asks for one.
PROTOCOLS = {
    "vmc": ("capture.vmc", "VmcStream"),
    "vrchat": ("capture.vrchat", "VRChatStream"),
    "livelink": ("capture.livelink", "LiveLinkStream"),
    "ws": ("capture.webstream", "WebSocketStream"),
}


def stream_class(scheme: str) -> type[Stream]:
    if scheme not in PROTOCOLS:
        known = ", ".join(f"{s}://" for s in PROTOCOLS)
        raise StreamError(f"unknown stream protocol {scheme + '://' if scheme else '(none)'}; use one of {known}")
    module, name = PROTOCOLS[scheme]
    return getattr(importlib.import_module(module), name)


def open_stream(url: str) -> Stream:
    """'vmc://127.0.0.1:39539', 'vrchat://', 'livelink://host', 'ws://0.0.0.0:8765?x=y' -> Stream.

    Host and port may be left out (127.0.0.1 and the protocol's default port);
    query options are passed to the protocol as keyword strings.
    """
    if "://" not in url:
        raise StreamError(f"stream URL {url!r} needs a protocol, e.g. vmc://127.0.0.1:39539")
    parts = urlsplit(url)
    cls = stream_class(parts.scheme)
    try:
        port = cls.default_port if parts.port is None else parts.port
    except ValueError:
        raise StreamError(f"bad port in stream URL {url!r}") from None
    host = parts.hostname or "127.0.0.1"
    if parts.path not in ("", "/"):
        raise StreamError(f"stream URL {url!r} has a path; give only host, port and ?options")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    try:
        return cls(host, port, **options)
    except TypeError as exc:
        raise StreamError(f"bad option in stream URL {url!r}: {exc}") from None


class StreamHub:
    """Sends each frame to every stream, at most max_fps frames a second.

    A stream that raises is reported once on stderr and skipped from then on:
    a bug in one protocol never stops capture or the other streams. A stream
    whose sends fail (send_error) is reported once and goes on trying.
    """

    def __init__(self, streams: list[Stream], max_fps: float | None = None):
        if max_fps is not None and not max_fps > 0:
            raise StreamError(f"--stream-fps must be > 0, got {max_fps}")
        self.streams = list(streams)
        self.min_interval_s = 1.0 / max_fps if max_fps else 0.0
        self._last_time_s = -np.inf
        self.failed: dict[str, str] = {}
        self._warned: set[str] = set()

    def send(self, frame: StreamFrame) -> bool:
        """Returns False when the rate cap skipped the frame."""
        # 1 ms slack: a camera's 30 frames/s should not be cut to 15 by a cap of 30. A clock
        # that goes back (a new take, a replay's next pass) starts the cap afresh.
        since = frame.time_s - self._last_time_s
        if 0 <= since < self.min_interval_s - 1e-3:
            return False
        self._last_time_s = frame.time_s
        for stream in self.streams:
            if stream.url in self.failed:
                continue
            stream.offered += 1
            try:
                stream.send(frame)
            except Exception as exc:  # noqa: BLE001 - one protocol's failure must not stop capture
                self.failed[stream.url] = f"{type(exc).__name__}: {exc}"
                print(f"capture: warning: stream {stream.url} stopped: {self.failed[stream.url]}",
                      file=sys.stderr)
                continue
            if stream.send_error is not None and stream.url not in self._warned:
                self._warned.add(stream.url)
                print(f"capture: warning: stream {stream.url}: sending fails: {stream.send_error}; "
                      "only frames that go out are counted", file=sys.stderr)
        return True

    def summary(self) -> str:
        """One line: what each stream really sent."""
        parts = []
        for stream in self.streams:
            part = stream.summary()
            if stream.url in self.failed:
                part += f" (stopped: {self.failed[stream.url]})"
            parts.append(part)
        return "; ".join(parts)

    def nothing_went_out(self) -> bool:
        """True when every stream stopped, or failed to send every frame it was given."""
        return all(s.url in self.failed or (s.send_error is not None and s.sent == 0) for s in self.streams)

    def close(self) -> None:
        for stream in self.streams:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing the others matters more
                pass


def stream_frame(result, captured_s: float, fps: float) -> StreamFrame:
    """A pipeline FrameResult -> StreamFrame (duck-typed, so this module needs no pipeline)."""
    frame = StreamFrame(result.index, result.time_s, captured_s, result.face_found, fps,
                        image_size=tuple(result.image_size))
    if result.face_found:
        frame.blendshapes = result.blendshapes
        frame.head_rotation = head_rotation(result.rotation)
        frame.head_ypr_rad = result.head_ypr_rad
        frame.head_position_cm = result.translation
        frame.eyes_ypr_rad = result.eyes_ypr_rad
        frame.landmarks_px = result.landmarks[:, :2]
    return frame


def track_frames(track: dict[str, np.ndarray]):
    """The frames of a recorded track.npz as StreamFrames (captured_s 0: set when sent).

    Takes written before eye angles were recorded stream eyes at 0; landmarks
    are the fitted mesh's 68 points.
    """
    fps = float(track["fps"]) if "fps" in track and np.isfinite(track["fps"]) else 30.0
    eyes = track.get("eyes_ypr_rad")
    size = tuple(int(v) for v in track["image_size"])
    for i in range(len(track["frame_index"])):
        frame = StreamFrame(int(track["frame_index"][i]), float(track["time_s"][i]), 0.0,
                            bool(track["face_found"][i]), fps, image_size=size)
        if frame.face_found:
            R = track["rotation"][i].astype(np.float64)
            frame.blendshapes = track["blendshapes"][i]
            frame.head_rotation = head_rotation(R)
            frame.head_ypr_rad = yaw_pitch_roll(frame.head_rotation)
            frame.head_position_cm = track["translation"][i].astype(np.float64)
            frame.eyes_ypr_rad = np.nan_to_num(eyes[i]) if eyes is not None else np.zeros((2, 3))
            frame.landmarks_px = track["landmarks68"][i]
        yield frame


#: Longest pause replay() keeps between two frames of a take, seconds; longer gaps (a
#: paused camera, a broken clock) are shortened to this so that replay never hangs.
MAX_REPLAY_GAP_S = 1.0


def looped(frames_of_pass, passes: int | None = None):
    """Frames of one pass after another (frames_of_pass() makes a pass); passes=None: for ever."""
    done = 0
    while passes is None or done < passes:
        yield from frames_of_pass()
        done += 1


def replay(frames, hub: StreamHub, speed: float = 1.0, should_stop=None, on_frame=None,
           max_gap_s: float = MAX_REPLAY_GAP_S) -> int:
    """Sends recorded frames at their own times (scaled by 1/speed); returns frames sent.

    Frames are sent as their time comes, so a slow receiver never slows the
    clock; should_stop() is polled between frames. Each frame's time_s is
    rewritten to the replay's own clock, which starts at the first frame's time
    and only moves forward: a gap of more than max_gap_s counts as max_gap_s (said
    once on stderr), and a time that goes back or is not a number (the next
    pass of a loop, a broken take) counts as one frame interval. Receivers thus
    see one steady clock across loop passes.
    """
    start = None
    clock_s = previous_s = shift_s = 0.0  # clock = take time + shift, the shift changing only at jumps
    sent = 0
    told = False
    for frame in frames:
        original_s = frame.time_s
        if start is None:
            clock_s = original_s if math.isfinite(original_s) else 0.0
            shift_s = clock_s - original_s if math.isfinite(original_s) else 0.0
            start = time.perf_counter() - clock_s / speed
        else:
            step_s = original_s - previous_s
            if not (math.isfinite(step_s) and 0 <= step_s <= max_gap_s):
                if math.isfinite(step_s) and step_s > max_gap_s:
                    if not told:
                        print(f"capture: note: the take's time jumps {step_s:.6g} s at frame {frame.index}; "
                              f"replay shortens gaps over {max_gap_s:g} s to {max_gap_s:g} s", file=sys.stderr)
                        told = True
                    step_s = max_gap_s
                else:  # back in time (the next pass of a loop) or not a number: one frame on
                    step_s = 1.0 / frame.fps if math.isfinite(frame.fps) and frame.fps > 0 else 1.0 / 30
                shift_s = clock_s + step_s - original_s if math.isfinite(original_s) else 0.0
            clock_s = original_s + shift_s if math.isfinite(original_s) else clock_s + step_s
        previous_s = original_s
        frame.time_s = clock_s
        delay = start + clock_s / speed - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if should_stop is not None and should_stop():
            break
        frame.captured_s = time.perf_counter()
        sent += hub.send(frame)
        if on_frame is not None:
            on_frame(frame)
    return sent
