"""capture.takes: a track.npz from elsewhere is read safely and validated, and the
commands that read takes (export, stream) refuse a hostile or broken one in one line."""
from __future__ import annotations

import io
import os
import shutil
import zipfile

import numpy as np
import pytest

from capture import cli
from capture.sinks import TrackWriter
from capture.takes import MIN_INFLATED_LIMIT_BYTES, TRACK_ARRAYS, TakeError, load_take, read_track
from engine.facemodel import DEFAULT_FACE_MODEL

FRAMES = 6


def _track_arrays() -> dict[str, np.ndarray]:
    """The arrays of a small, good take (as TrackWriter writes them)."""
    rng = np.random.default_rng(0)
    writer = TrackWriter(os.devnull, np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]]), (640, 480),
                         fps=30.0, checkpoint_every_s=1e9)
    writer.save = lambda frames=None: None  # arrays only
    for i in range(FRAMES):
        found = i != 2
        writer.add(i, i / 30.0, found, blendshapes=rng.random(52), expression=rng.random(53),
                   rotation=np.eye(3), translation=[0.0, 0.0, 50.0 + i], landmarks68=rng.random((68, 2)) * 640,
                   identity=rng.normal(size=60) * 0.1, eyes_ypr_rad=np.zeros((2, 3)))
    writer.set_identity(rng.normal(size=60) * 0.1)
    return {k: np.array(v) for k, v in writer.arrays().items()}


def _save(path, arrays, compressed=False):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_every_array_a_take_holds_is_known():
    """A new array in TrackWriter must be added to capture.takes, or takes would drop it."""
    assert set(_track_arrays()) == set(TRACK_ARRAYS)


def test_good_take_loads_whole(tmp_path):
    arrays = _track_arrays()
    got = load_take(_save(tmp_path / "track.npz", {**arrays, "extra_notes": np.arange(3)}))
    assert set(got) == set(arrays)  # unknown members are not loaded
    for name, value in arrays.items():
        np.testing.assert_array_equal(got[name], value)
        assert got[name].dtype == value.dtype
    load_take(_save(tmp_path / "small.npz", arrays, compressed=True))  # compressed takes are fine too


BOMB_INFLATED_BYTES = 4 * MIN_INFLATED_LIMIT_BYTES  # 256 MiB


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A track.npz, about 1 MB, whose blendshapes inflate to BOMB_INFLATED_BYTES: an honest zip
    (its sizes and CRC true), only very compressible."""
    path = tmp_path_factory.mktemp("bomb") / "track.npz"
    arrays = _track_arrays()
    n = BOMB_INFLATED_BYTES // (52 * 4)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (n, 52)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, value in arrays.items():
            if name != "blendshapes":
                buf = io.BytesIO()
                np.save(buf, value)
                z.writestr(name + ".npy", buf.getvalue())
        with z.open("blendshapes.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            zeros = bytes(1 << 24)
            for _ in range(n * 52 * 4 // len(zeros)):
                f.write(zeros)
            f.write(bytes(n * 52 * 4 % len(zeros)))
    return path


def test_zip_bomb_is_refused_before_inflating(bomb):
    import tracemalloc

    assert bomb.stat().st_size < BOMB_INFLATED_BYTES / 100
    tracemalloc.start()
    try:
        with pytest.raises(TakeError, match=r"would inflate to 268 MB from 1\.\d MB: refused"):
            read_track(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20  # nothing near the bomb's size was allocated


def test_header_larger_than_its_data_is_refused(tmp_path):
    """An .npy header may claim any shape, and numpy allocates it before reading the data."""
    path = tmp_path / "track.npz"
    with zipfile.ZipFile(path, "w") as z:
        for name, value in _track_arrays().items():
            buf = io.BytesIO()
            if name == "blendshapes":
                np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                                           "shape": (10 ** 12, 52)})
                buf.write(value.tobytes())
            else:
                np.save(buf, value)
            z.writestr(name + ".npy", buf.getvalue())
    with pytest.raises(TakeError, match="blendshapes: its header says 208000000000000 bytes"):
        read_track(path)


def test_corrupt_compressed_data_is_refused(tmp_path):
    path = _save(tmp_path / "track.npz", _track_arrays(), compressed=True)
    data = bytearray(path.read_bytes())
    at = data.find(b"blendshapes.npy") + 60  # inside its deflate stream
    data[at:at + 200] = bytes(range(200))
    path.write_bytes(bytes(data))
    with pytest.raises(TakeError, match="cannot read .*track.npz: .*decompressing"):
        read_track(path)


def test_pickles_are_never_loaded(tmp_path):
    arrays = _track_arrays()
    arrays["blendshape_names"] = np.array([object()] * 52, dtype=object)
    path = tmp_path / "track.npz"
    np.savez(path, **arrays)
    with pytest.raises(TakeError, match="Python objects"):
        read_track(path)


@pytest.mark.parametrize("change, words", [
    (lambda a: a.pop("blendshapes"), "missing blendshapes"),
    (lambda a: [a.pop("landmarks68"), a.pop("image_size")], "missing landmarks68, image_size"),
    (lambda a: a.update(time_s=a["time_s"][:-1]), "time_s has shape (5,), expected (6,)"),
    (lambda a: a.update(blendshapes=a["blendshapes"][:, :51]), "blendshapes has shape (6, 51), expected (6, 52)"),
    (lambda a: a.update(rotation=a["rotation"][:, :2]), "rotation has shape (6, 2, 3)"),
    (lambda a: a.update(landmarks68=a["landmarks68"][:-2]), "landmarks68 has shape (4, 68, 2)"),
    (lambda a: a.update(camera_matrix=np.eye(4)), "camera_matrix has shape (4, 4), expected (3, 3)"),
    (lambda a: a.update(face_found=a["face_found"].astype(np.float32)), "face_found has type float32"),
    (lambda a: a.update(blendshape_names=a["blendshape_names"][::-1]), "not the 52 ARKit names"),
    (lambda a: a["blendshapes"].__setitem__((0, 3), np.nan), "blendshapes is not finite"),
    (lambda a: a["blendshapes"].__setitem__((0, 3), 7.0), "outside [0, 1]"),
    (lambda a: a["rotation"].__setitem__(1, 2 * np.eye(3)), "not rotations"),
    (lambda a: a["time_s"].__setitem__(4, np.inf), "time_s is not finite"),
])
def test_broken_takes_are_refused_naming_the_problem(tmp_path, change, words):
    arrays = _track_arrays()
    change(arrays)
    path = _save(tmp_path / "track.npz", arrays)
    with pytest.raises(TakeError) as info:
        load_take(path)
    message = str(info.value)
    assert words in message and str(path) in message and "\n" not in message


def test_frames_without_a_face_may_hold_nan(tmp_path):
    arrays = _track_arrays()
    assert not arrays["face_found"][2] and np.isnan(arrays["blendshapes"][2]).all()
    load_take(_save(tmp_path / "track.npz", arrays))


# ----------------------------------------------------------------------------- the commands

needs_model = pytest.mark.skipif(not DEFAULT_FACE_MODEL.is_file(), reason="face model missing")


def _one_line(status, err) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("capture: device: ")]  # start-up line
    assert status == 1 and len(lines) == 1 and lines[0].startswith("capture: error:"), err
    return lines[0]


@needs_model
@pytest.mark.parametrize("command", [["export", "{take}", "--quiet"],
                                     ["stream", "{take}", "--to", "vmc://127.0.0.1:9", "--quiet"],
                                     ["stream", "{take}", "--to", "vmc://127.0.0.1:9", "--actor", "off",
                                      "--quiet"]])
@pytest.mark.parametrize("hostile", ["bomb", "wrong_shapes", "unequal", "missing", "no_image_size"])
def test_commands_refuse_hostile_takes_in_one_line(tmp_path, capsys, bomb, command, hostile):
    take = tmp_path / "take"
    take.mkdir()
    arrays = _track_arrays()
    if hostile == "bomb":
        shutil.copy(bomb, take / "track.npz")
    else:
        if hostile == "wrong_shapes":
            arrays["blendshapes"] = np.zeros((FRAMES, 40), np.float32)
        elif hostile == "unequal":
            arrays["translation"] = arrays["translation"][:3]
        elif hostile == "missing":
            del arrays["rotation"]
        else:
            del arrays["image_size"]
        _save(take / "track.npz", arrays)
    status = cli.main([a.format(take=take) for a in command])
    line = _one_line(status, capsys.readouterr().err)
    assert "track.npz" in line
    assert sorted(os.listdir(take)) == ["track.npz"]  # no .glb, no .tmp


@needs_model
def test_export_that_cannot_write_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    from fault_injection import FullDisk

    take = tmp_path / "take"
    take.mkdir()
    _save(take / "track.npz", _track_arrays())
    import capture.gltf_export

    disk = FullDisk(take, (take / "track.npz").stat().st_size + 100_000)  # the .glb is ~10 MB
    disk.install(monkeypatch, capture.gltf_export)
    line = _one_line(cli.main(["export", str(take), "--quiet"]), capsys.readouterr().err)
    assert "cannot write" in line and "no space left" in line
    assert sorted(os.listdir(take)) == ["track.npz"]
    monkeypatch.undo()
    (tmp_path / "glb_dir").mkdir()
    line = _one_line(cli.main(["export", str(take), "--out", str(tmp_path / "glb_dir"), "--quiet"]),
                     capsys.readouterr().err)
    assert "is a folder" in line


@needs_model
def test_stream_with_a_profile_refuses_expression_of_another_model(tmp_path, capsys):
    arrays = _track_arrays()
    arrays["expression"] = np.zeros((FRAMES, 40), np.float32)
    take = _save(tmp_path / "track.npz", arrays)
    line = _one_line(cli.main(["stream", str(take), "--to", "vmc://127.0.0.1:9", "--actor", "off", "--quiet"]),
                     capsys.readouterr().err)
    assert "40 expression weights" in line
