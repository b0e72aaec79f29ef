"""`capture live` without a webcam: a recorded video stands in for the camera."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import capture.sources as sources
from capture import cli
from capture.sinks import load_track, read_livelink_csv

VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "d12.mp4"
pytestmark = pytest.mark.skipif(not VIDEO.exists(), reason=f"shared video missing: {VIDEO}")


class FakeCamera(sources.VideoSource):
    """A video played as a live camera: frames come at the video's own rate."""

    def __init__(self, index, width=None, height=None, fps=None):
        super().__init__(VIDEO)
        self.live = True

    def __iter__(self):
        start = time.monotonic()
        for frame in super().__iter__():
            delay = frame.time_s - (time.monotonic() - start)
            if delay > 0:
                time.sleep(delay)
            yield frame


def test_live_capture_records_a_take(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "CameraSource", FakeCamera)
    out = tmp_path / "live"
    status = cli.main(["live", "--camera", "0", "--out", str(out), "--max-frames", "25", "--quiet"])
    assert status == 0, capsys.readouterr().err
    track = load_track(out / "track.npz")
    assert len(track["frame_index"]) == 25
    assert track["face_found"].all()
    # live mode may drop stale frames, but indices only ever increase
    assert np.all(np.diff(track["frame_index"]) > 0)
    _, shapes, _ = read_livelink_csv(out / "blendshapes.csv")
    assert shapes.shape == (25, 52)
    assert not (out / "meshes").exists()  # live writes no meshes unless asked


def test_live_without_camera_is_one_line_error(capsys):
    status = cli.main(["live", "--camera", "97", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1 and err[0].startswith("capture: error:") and "97" in err[0]


def test_preview_overlay_draws_mesh_over_picture():
    from capture.pipeline import CaptureSettings, FaceCapture
    from capture.preview import draw_overlay
    from engine.correspondence import LandmarkCorrespondence
    from engine.facemodel import FaceModel

    model = FaceModel.load()
    fc = FaceCapture(model, LandmarkCorrespondence.load(), CaptureSettings())
    frame = next(iter(sources.VideoSource(VIDEO)))
    result = fc.process(frame.image, frame.time_s, frame.index)
    assert result.face_found
    drawn = draw_overlay(frame.image, fc, result, model.triangles[:2000])
    changed = np.any(drawn[:, :, ::-1] != frame.image, axis=2)
    box = result.landmarks68
    x0, y0 = box.min(axis=0).astype(int)
    x1, y1 = box.max(axis=0).astype(int)
    inside = changed[y0:y1, x0:x1].mean()
    outside = changed.mean() - changed[y0:y1, x0:x1].sum() / changed.size
    assert inside > 0.05  # the wireframe covers the face
    assert inside > 5 * outside  # and stays on it


def test_preview_without_display_is_one_line_error(monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    status = cli.main(["live", "--camera", "0", "--preview", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1 and "needs a display" in err[0]


def test_live_streams_and_survives_receivers_that_go_away(monkeypatch, capsys):
    """Two UDP receivers and a WebSocket client; all three leave mid-take and capture carries on."""
    import socket
    import threading

    from websockets.sync.client import connect

    monkeypatch.setattr(sources, "CameraSource", FakeCamera)
    receivers = {}
    for name in ("vmc", "livelink"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5.0)
        receivers[name] = sock
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    ws_port = probe.getsockname()[1]
    probe.close()
    got = {name: 0 for name in receivers} | {"ws": 0}
    ports = {name: sock.getsockname()[1] for name, sock in receivers.items()}

    def listen(name, sock):
        while got[name] < 5:  # take five packets, then go away
            sock.recv(65536)
            got[name] += 1
        sock.close()

    def watch():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with connect(f"ws://127.0.0.1:{ws_port}/ws", open_timeout=1) as client:
                    while got["ws"] < 5:
                        client.recv(timeout=5)
                        got["ws"] += 1
                return  # the client disconnects mid-take
            except OSError:
                time.sleep(0.05)  # the server is not up yet

    threads = [threading.Thread(target=listen, args=item, daemon=True) for item in receivers.items()]
    threads.append(threading.Thread(target=watch, daemon=True))
    for t in threads:
        t.start()
    argv = ["live", "--max-frames", "40", "--quiet", "--stream", f"ws://127.0.0.1:{ws_port}"]
    for name, sock in receivers.items():
        argv += ["--stream", f"{name}://127.0.0.1:{sock.getsockname()[1]}"]
    start = time.monotonic()
    status = cli.main(argv)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert status == 0, err
    for t in threads:
        t.join(timeout=5)
    assert got == {"vmc": 5, "livelink": 5, "ws": 5}
    assert "40 frames" in err and "warning" not in err
    # what each stream really sent (UDP goes out with or without a listener; the page got 5 or more)
    summary = next(line for line in err.splitlines() if line.startswith("streams: "))
    for name, port in ports.items():
        assert f"{name}://127.0.0.1:{port}: 40 of 40 frames sent" in summary, summary
    assert "frames reached a client" in summary
    assert elapsed < 20  # 40 frames at 30 frames/s, plus start-up: nothing stalled
