"""capture/streams.py: URLs, the hub's fan-out and rate cap, frames from results and tracks, replay."""
from __future__ import annotations

import time

import numpy as np
import pytest

from capture import streams
from capture.pipeline import FrameResult
from capture.sinks import TrackWriter, load_track
from capture.streams import (StreamError, StreamFrame, StreamHub, UdpStream, open_stream, replay, stream_frame,
                             track_frames)
from engine.pose import model_to_camera


class Recorder(streams.Stream):
    """A stream that keeps what it is sent; options come from the URL query."""

    scheme = "rec"
    default_port = 4321

    def __init__(self, host, port, colour="none"):
        super().__init__(host, port)
        self.colour = colour
        self.frames = []
        self.closed = False

    def send(self, frame):
        self.frames.append(frame)

    def close(self):
        self.closed = True


class Broken(Recorder):
    scheme = "broken"

    def send(self, frame):
        raise RuntimeError("receiver bug")


@pytest.fixture
def protocols(monkeypatch):
    table = dict(streams.PROTOCOLS, rec=(__name__, "Recorder"), broken=(__name__, "Broken"))
    monkeypatch.setattr(streams, "PROTOCOLS", table)


def frame(i, time_s, face=True):
    return StreamFrame(i, time_s, time.perf_counter(), face, blendshapes=np.full(52, 0.5) if face else None)


def test_url_defaults_and_options(protocols):
    s = open_stream("rec://")
    assert (s.host, s.port, s.colour) == ("127.0.0.1", 4321, "none")
    s = open_stream("rec://10.1.2.3:99?colour=red")
    assert (s.host, s.port, s.colour) == ("10.1.2.3", 99, "red")
    assert s.url == "rec://10.1.2.3:99"


@pytest.mark.parametrize("url, words", [
    ("127.0.0.1:39539", "needs a protocol"),
    ("osc://127.0.0.1:9000", "unknown stream protocol osc://"),
    ("rec://host:port", "bad port"),
    ("rec://host:1/path", "has a path"),
    ("rec://host:1?shade=blue", "bad option"),
])
def test_bad_urls_are_one_line_errors(protocols, url, words):
    with pytest.raises(StreamError) as err:
        open_stream(url)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_every_registered_protocol_opens_with_defaults():
    for scheme in streams.PROTOCOLS:
        s = open_stream(f"{scheme}://127.0.0.1:0" if scheme == "ws" else f"{scheme}://")
        try:
            assert s.scheme == scheme and s.default_port > 0
        finally:
            s.close()


def test_hub_fans_out_and_caps_the_rate():
    a, b = Recorder("h", 1), Recorder("h", 2)
    hub = StreamHub([a, b], max_fps=10)
    sent = [hub.send(frame(i, i / 30)) for i in range(30)]  # one second at 30 frames/s
    assert sum(sent) == 10
    assert [f.index for f in a.frames] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert [f.index for f in b.frames] == [f.index for f in a.frames]
    hub.close()
    assert a.closed and b.closed


def test_hub_cap_at_the_source_rate_keeps_every_frame():
    a = Recorder("h", 1)
    hub = StreamHub([a], max_fps=30)
    times = np.arange(60) / 30 + np.random.default_rng(0).normal(0, 2e-4, 60)  # camera clock jitter
    assert all(hub.send(frame(i, t)) for i, t in enumerate(times))


def test_a_failing_stream_is_dropped_and_the_others_go_on(capsys):
    good, bad = Recorder("h", 1), Broken("h", 2)
    hub = StreamHub([bad, good])
    for i in range(5):
        hub.send(frame(i, i / 30))
    assert len(good.frames) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken://h:2 stopped: RuntimeError: receiver bug" in err[0]
    assert hub.failed == {"broken://h:2": "RuntimeError: receiver bug"}


def test_bad_rate_cap():
    with pytest.raises(StreamError):
        StreamHub([], max_fps=0)


def test_udp_stream_without_receiver_never_blocks(silent_udp_port):
    s = UdpStream("127.0.0.1", silent_udp_port)
    start = time.perf_counter()
    for _ in range(1000):
        s.send_datagrams([b"x" * 1000], time.perf_counter())
    assert time.perf_counter() - start < 1.0
    assert s.sent == 1000 and len(s.latency_s) == 1000
    s.close()


def test_stream_keeps_the_latency_of_its_newest_frames_only(silent_udp_port, monkeypatch):
    """A live session streams for hours: the latency record must not grow with it."""
    monkeypatch.setattr(streams, "LATENCY_HISTORY_FRAMES", 10)
    s = UdpStream("127.0.0.1", silent_udp_port)
    now = time.perf_counter()
    for i in range(25):  # frame i captured 100 - i seconds ago
        s.send_datagrams([b"x"], now - (100 - i))
    s.close()
    assert s.sent == 25 and len(s.latency_s) == 10
    np.testing.assert_allclose(list(s.latency_s), 100 - np.arange(15, 25), atol=1.0)  # frames 15-24


def test_unresolvable_host():
    with pytest.raises(StreamError, match="cannot resolve"):
        UdpStream("no-such-host.invalid", 9000)


def test_stream_frame_from_a_result():
    R = model_to_camera(0.3, -0.1, 0.05)
    result = FrameResult(7, 0.25, True, np.eye(3), (640, 480), landmarks=np.ones((478, 3)), rotation=R,
                         translation=np.array([1.0, 2.0, 60.0]), blendshapes=np.linspace(0, 1, 52),
                         head_ypr_rad=np.array([0.3, -0.1, 0.05]), eyes_ypr_rad=np.zeros((2, 3)))
    f = stream_frame(result, captured_s=12.5, fps=25.0)
    assert (f.index, f.time_s, f.captured_s, f.fps, f.image_size) == (7, 0.25, 12.5, 25.0, (640, 480))
    # the head rotation is the y-up face frame's: yaw about +y, and back to the same angles
    from engine.pose import euler_yxz
    np.testing.assert_allclose(f.head_rotation, euler_yxz(0.3, -0.1, 0.05), atol=1e-12)
    assert f.landmarks_px.shape == (478, 2)
    lost = stream_frame(FrameResult(8, 0.3, False, np.eye(3), (640, 480)), 13.0, 25.0)
    assert not lost.face_found and lost.blendshapes is None and lost.head_rotation is None


def test_track_frames_replay_what_was_recorded(tmp_path):
    path = tmp_path / "track.npz"
    writer = TrackWriter(path, np.eye(3), (320, 240), fps=25.0)
    R = model_to_camera(-0.2, 0.1, 0.0)
    eyes = np.array([[0.1, -0.05, 0.0], [0.12, -0.04, 0.0]])
    writer.add(0, 0.0, True, blendshapes=np.full(52, 0.25), rotation=R, translation=np.array([0, 0, 50.0]),
               landmarks68=np.zeros((68, 2)), eyes_ypr_rad=eyes)
    writer.add(1, 0.04, False)
    writer.close()
    frames = list(track_frames(load_track(path)))
    assert [f.face_found for f in frames] == [True, False]
    assert frames[0].fps == 25.0 and frames[0].image_size == (320, 240)
    np.testing.assert_allclose(frames[0].head_ypr_rad, [-0.2, 0.1, 0.0], atol=1e-6)
    np.testing.assert_allclose(frames[0].eyes_ypr_rad, eyes, atol=1e-7)
    np.testing.assert_allclose(frames[0].blendshapes, 0.25)
    assert frames[1].blendshapes is None


def test_replay_keeps_the_takes_clock():
    rec = Recorder("h", 1)
    frames = [frame(i, i * 0.05) for i in range(8)]  # 0.35 s of take
    start = time.perf_counter()
    assert replay(frames, StreamHub([rec]), speed=2.0) == 8
    elapsed = time.perf_counter() - start
    assert 0.17 <= elapsed < 0.35  # 0.175 s at double speed
    sent_at = np.array([f.captured_s for f in rec.frames]) - rec.frames[0].captured_s
    np.testing.assert_allclose(sent_at, np.arange(8) * 0.025, atol=0.015)


def test_replay_stops_when_asked():
    rec = Recorder("h", 1)
    frames = [frame(i, i * 0.01) for i in range(50)]
    assert replay(frames, StreamHub([rec]), should_stop=lambda: len(rec.frames) >= 3) == 3


# ---------------------------------------------------------------- loops, gaps, unsendable streams


def test_every_pass_of_a_loop_reaches_the_streams():
    """A replay's next pass starts over at the take's first time; the hub must not take that for
    frames too close together (it did: only the first pass went out), capped or not."""
    for cap in (None, 100):  # none, and one at the take's own rate
        rec = Recorder("h", 1)
        def take():  # 5 frames of a 100 frames/s take
            frames = [frame(i, i / 100) for i in range(5)]
            for f in frames:
                f.fps = 100.0
            return frames

        passes = streams.looped(take, 3)
        assert replay(passes, StreamHub([rec], max_fps=cap), speed=10.0) == 15
        assert [f.index for f in rec.frames] == list(range(5)) * 3
        times = np.array([f.time_s for f in rec.frames])  # one clock across passes, a frame apart
        np.testing.assert_allclose(np.diff(times), 0.01, atol=1e-9)


def test_a_clock_that_goes_back_restarts_the_rate_cap():
    rec = Recorder("h", 1)
    hub = StreamHub([rec], max_fps=10)
    assert hub.send(frame(0, 5.0)) and not hub.send(frame(1, 5.05))
    assert hub.send(frame(2, 0.0))  # a new take's clock
    assert [f.index for f in rec.frames] == [0, 2]


def test_replay_shortens_absurd_gaps(capsys):
    rec = Recorder("h", 1)
    frames = [frame(0, 0.0), frame(1, 0.04), frame(2, 1e9), frame(3, 1e9 + 0.04), frame(4, 2e9)]
    start = time.perf_counter()
    assert replay(frames, StreamHub([rec]), speed=8.0) == 5
    assert time.perf_counter() - start < 2.0  # 2 gaps of 1 s at 8x, not 2e9 s
    np.testing.assert_allclose([f.time_s for f in rec.frames], [0.0, 0.04, 1.04, 1.08, 2.08])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "jumps 1e+09 s at frame 2" in err[0] and "1 s" in err[0]


def test_replay_survives_times_that_are_not_numbers():
    rec = Recorder("h", 1)
    frames = [frame(0, float("nan")), frame(1, float("inf")), frame(2, -5.0), frame(3, 0.1)]
    assert replay(frames, StreamHub([rec]), speed=10.0) == 4
    times = [f.time_s for f in rec.frames]
    assert all(np.isfinite(times)) and np.all(np.diff(times) > 0)


def test_port_zero_is_a_one_line_error():
    with pytest.raises(StreamError) as err:
        open_stream("vmc://127.0.0.1:0")
    assert "port 0" in str(err.value) and "\n" not in str(err.value)


def test_unsendable_stream_says_so_once_and_counts_nothing_sent(capsys):
    """A broadcast address (the socket may not broadcast): every datagram fails. The hub says so
    once; sent counts only frames that went out."""
    from capture.vmc import VmcStream

    stream = VmcStream("255.255.255.255", 39539)
    hub = StreamHub([stream])
    for i in range(5):
        hub.send(frame(i, i / 30))
    hub.close()
    assert (stream.offered, stream.sent, len(stream.latency_s)) == (5, 0, 0)
    assert stream.dropped == 10 and stream.send_error  # two bundles a face frame
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vmc://255.255.255.255:39539: sending fails" in err[0]
    assert hub.nothing_went_out()
    assert "0 of 5 frames sent" in hub.summary()


def test_a_working_stream_is_counted_frame_by_frame(udp_socket):
    from capture.livelink import LiveLinkStream

    s = LiveLinkStream("127.0.0.1", udp_socket.getsockname()[1])
    hub = StreamHub([s])
    for i in range(3):
        hub.send(frame(i, i / 30))
    s.close()
    assert (s.offered, s.sent, s.dropped, s.send_error) == (3, 3, 0, None)
    assert not hub.nothing_went_out() and hub.summary() == f"{s.url}: 3 of 3 frames sent"
