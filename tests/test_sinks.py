"""Tests for capture.sinks: Live Link CSV, mesh sequence files, track.npz."""
from __future__ import annotations

import csv
import os
import time

import numpy as np
import pytest

from engine.arkit import ARKIT_NAMES, LIVELINK_CSV_NAMES, LIVELINK_POSE_NAMES
from capture.sinks import (
    LiveLinkCsvWriter,
    MeshSequenceWriter,
    TrackWriter,
    livelink_timecode,
    load_track,
    read_livelink_csv,
    read_obj,
    read_ply,
)

# ---------------------------------------------------------------- CSV


def _header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))


def test_csv_header_exact(tmp_path):
    path = tmp_path / "take.csv"
    with LiveLinkCsvWriter(path, fps=30.0):
        pass
    header = _header(path)
    assert len(header) == 2 + 52 + 9 == 63
    assert header[:3] == ["Timecode", "BlendShapeCount", "EyeBlinkLeft"]
    assert header[-1] == "RightEyeRoll"
    assert header == ["Timecode", "BlendShapeCount", *LIVELINK_CSV_NAMES, *LIVELINK_POSE_NAMES]
    # Live Link order differs from Apple's exactly at Jaw and Mouth Left/Right.
    assert header.index("JawRight") < header.index("JawLeft")
    assert header.index("MouthRight") < header.index("MouthLeft")


def test_csv_reorders_by_name(tmp_path):
    path = tmp_path / "take.csv"
    shapes = (np.arange(52) + 1) / 100.0  # distinct value per ARKit index
    head = np.array([0.1, -0.2, 0.3])
    left = np.array([-0.4, 0.5, -0.6])
    right = np.array([0.7, -0.8, 0.9])
    with LiveLinkCsvWriter(path, fps=30.0) as w:
        w.write(0.0, shapes, head, left, right)
        w.write(1.0, shapes[::-1], head, left, right)

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    row = rows[0]
    assert row["BlendShapeCount"] == "61"
    for name in ("jawLeft", "jawRight", "mouthLeft", "mouthRight", "eyeBlinkLeft", "tongueOut"):
        pascal = name[0].upper() + name[1:]
        assert float(row[pascal]) == pytest.approx(shapes[ARKIT_NAMES.index(name)])
    assert float(row["JawLeft"]) == pytest.approx(0.16)
    assert float(row["JawRight"]) == pytest.approx(0.17)
    assert float(row["MouthLeft"]) == pytest.approx(0.22)
    assert float(row["MouthRight"]) == pytest.approx(0.23)
    # the app's signs: yaw and roll negated (engine/pose.py's yaw > 0 is toward the subject's left)
    assert float(row["HeadYaw"]) == pytest.approx(-0.1) and float(row["HeadRoll"]) == pytest.approx(-0.3)
    assert float(row["HeadPitch"]) == pytest.approx(-0.2)
    assert float(row["LeftEyeRoll"]) == pytest.approx(0.6) and float(row["LeftEyePitch"]) == pytest.approx(0.5)
    assert float(row["RightEyeYaw"]) == pytest.approx(-0.7)

    timecodes, bs, pose = read_livelink_csv(path)
    assert timecodes == ["00:00:00:00.000", "00:00:01:00.000"]
    assert bs.shape == (2, 52) and pose.shape == (2, 9)
    np.testing.assert_allclose(bs[0], shapes, atol=1e-6)
    np.testing.assert_allclose(bs[1], shapes[::-1], atol=1e-6)
    # read back in engine/pose.py's convention
    np.testing.assert_allclose(pose[0], np.concatenate([head, left, right]), atol=1e-6)


def test_csv_reader_finds_columns_by_name(tmp_path):
    """A file with shuffled columns reads back the same values."""
    path = tmp_path / "take.csv"
    shapes = np.linspace(0.0, 1.0, 52)
    with LiveLinkCsvWriter(path, fps=60.0) as w:
        w.write(0.5, shapes, np.zeros(3), np.ones(3), -np.ones(3))
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    perm = np.random.default_rng(0).permutation(len(rows[0]))
    shuffled = tmp_path / "shuffled.csv"
    with open(shuffled, "w", newline="") as f:
        csv.writer(f).writerows([[r[i] for i in perm] for r in rows])
    t1, b1, p1 = read_livelink_csv(path)
    t2, b2, p2 = read_livelink_csv(shuffled)
    assert t1 == t2 == ["00:00:00:30.000"]
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(p1, p2)


def _rightward_look(row, eye):
    """Live Link Face's rightward look of one eye from a CSV row: the left eye looks to the
    subject's right by turning in, the right eye by turning out (ARKit's eyeLook* definitions)."""
    if eye == "Left":
        return float(row["EyeLookInLeft"]) - float(row["EyeLookOutLeft"])
    return float(row["EyeLookOutRight"]) - float(row["EyeLookInRight"])


def test_csv_eye_yaw_follows_live_link_face_takes(tmp_path):
    """Real Live Link Face exports: per eye, yaw rises about 0.6 rad per unit of the rightward look
    shapes (positive yaw looks to the subject's right). Rows written from gaze angles (engine.gaze
    makes the eyeLook shapes from the same angles the CSV's yaw columns come from) must show the same
    relation, read from the file's text by column name."""
    from engine.arkit import arkit_name_of_model_shape
    from engine.gaze import eye_look_weights

    path = tmp_path / "take.csv"
    rng = np.random.default_rng(3)
    with LiveLinkCsvWriter(path, fps=30.0) as w:
        for k in range(40):
            angles = rng.uniform(-0.45, 0.45, (2, 2))  # (yaw, pitch) per eye, engine/pose.py's signs
            shapes = np.zeros(52)
            for name, value in eye_look_weights(angles).items():
                shapes[ARKIT_NAMES.index(arkit_name_of_model_shape(name))] = value
            head = rng.uniform(-0.3, 0.3, 3)
            w.write(k / 30, shapes, head, [*angles[0], 0.0], [*angles[1], 0.0])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for eye in ("Left", "Right"):
        look = np.array([_rightward_look(r, eye) for r in rows])
        yaw = np.array([float(r[f"{eye}EyeYaw"]) for r in rows])
        inside = np.abs(look) < 0.99  # the look shapes saturate at 1
        slope = (look[inside] @ yaw[inside]) / (look[inside] @ look[inside])
        assert 0.4 < slope < 0.8, (eye, slope)  # the app's 0.6; ours reaches 1 at 30 degrees, 0.52 rad
        np.testing.assert_allclose(yaw[inside], slope * look[inside], atol=1e-5)


def test_csv_swap_mouth_lr(tmp_path):
    shapes = np.zeros(52)
    shapes[ARKIT_NAMES.index("mouthLeft")], shapes[ARKIT_NAMES.index("jawLeft")] = 0.7, 0.4
    paths = tmp_path / "plain.csv", tmp_path / "swapped.csv"
    for path, swap in zip(paths, (False, True)):
        with LiveLinkCsvWriter(path, fps=30.0, swap_mouth_lr=swap) as w:
            w.write(0.0, shapes, np.zeros(3), np.zeros(3), np.zeros(3))
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows.append(next(csv.DictReader(f)))
    assert (float(rows[0]["MouthLeft"]), float(rows[0]["MouthRight"])) == (0.7, 0.0)
    assert (float(rows[1]["MouthLeft"]), float(rows[1]["MouthRight"])) == (0.0, 0.7)
    assert float(rows[1]["JawLeft"]) == 0.4  # only the mouth pair


def test_csv_has_no_negative_zeros(tmp_path):
    path = tmp_path / "take.csv"
    with LiveLinkCsvWriter(path, fps=30.0) as w:
        w.write(0.0, np.zeros(52), np.zeros(3), np.zeros(3), np.zeros(3))
    assert "-0.000000" not in path.read_text()


@pytest.mark.parametrize("time_s, fps, expected", [
    (3661.5, 30.0, "01:01:01:15.000"),
    (0.0, 30.0, "00:00:00:00.000"),
    (0.1, 30.0, "00:00:00:03.000"),      # 0.1 * 30 = 3.0000000000000004
    (1.0 / 60.0, 30.0, "00:00:00:00.500"),
    (59.99999, 30.0, "00:01:00:00.000"),  # rounds up into the next second
    (2.25, 60.0, "00:00:02:15.000"),
    (10.02, 29.97, "00:00:10:00.599"),
])
def test_timecode_format(time_s, fps, expected):
    assert livelink_timecode(time_s, fps) == expected


def test_csv_rows_survive_without_close(tmp_path):
    path = tmp_path / "take.csv"
    w = LiveLinkCsvWriter(path, fps=30.0)
    for k in range(3):
        w.write(k / 30.0, np.full(52, 0.25), np.zeros(3), np.zeros(3), np.zeros(3))
    # Not closed: another reader must already see every row.
    timecodes, bs, _ = read_livelink_csv(path)
    assert timecodes == ["00:00:00:00.000", "00:00:00:01.000", "00:00:00:02.000"]
    np.testing.assert_allclose(bs, 0.25)
    w.close()


def test_csv_reader_skips_cut_last_row(tmp_path):
    path = tmp_path / "take.csv"
    with LiveLinkCsvWriter(path, fps=30.0) as w:
        w.write(0.0, np.zeros(52), np.zeros(3), np.zeros(3), np.zeros(3))
    with open(path, "a") as f:
        f.write("00:00:00:01.000,61,0.5,0.5")  # a row cut by a crash
    timecodes, bs, pose = read_livelink_csv(path)
    assert timecodes == ["00:00:00:00.000"] and bs.shape == (1, 52) and pose.shape == (1, 9)


# ---------------------------------------------------------------- meshes


def _tricky_vertices(rng, n):
    v = rng.uniform(-30.0, 30.0, (n, 3)).astype(np.float32)
    special = np.float32([
        [-0.00004, 0.00004, 12.34565],
        [-12.34565, 0.00005, -0.00005],
        [0.03125, -0.03125, 0.0],       # exact ties: half to even
        [-0.0, 99.99995, -99.99995],
        [123456.78, -1e-7, 5e-5],
    ])
    v[: len(special)] = special
    return v


def _triangles(rng, n_vertices, n_triangles):
    return rng.integers(0, n_vertices, (n_triangles, 3)).astype(np.int32)


def test_obj_text_is_correctly_rounded(tmp_path):
    rng = np.random.default_rng(1)
    v = _tricky_vertices(rng, 500)
    tri = _triangles(rng, len(v), 100)
    path = MeshSequenceWriter(tmp_path, tri, "obj").write(0, v)
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    vlines = [ln for ln in lines if ln.startswith("v ")]
    # Same digits as Python's correctly rounded formatting of the float32 value;
    # a value that rounds to zero is written unsigned (harmless either way).
    expect = ["v " + " ".join(("%.4f" % x).replace("-0.0000", "0.0000") for x in row)
              for row in v.astype(np.float64).tolist()]
    assert vlines == expect
    # float32(12.34565) is 12.3456497..., so it rounds down; -0.00004 -> unsigned zero.
    assert vlines[0] == "v 0.0000 0.0000 12.3456"
    assert vlines[1] == "v -12.3456 0.0000 0.0000"  # float32(0.00005) is 4.99999987e-05
    assert vlines[2] == "v 0.0312 -0.0312 0.0000"  # exact ties go to even
    assert "-0.0000" not in text
    assert [ln for ln in lines if ln.startswith("f ")][0] == "f %d %d %d" % tuple(tri[0] + 1)


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_mesh_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(2)
    n_v, n_t = 2000, 3000
    tri = _triangles(rng, n_v, n_t)
    writer = MeshSequenceWriter(tmp_path / "seq", tri, fmt)
    frames = {}
    for number in (0, 1, 7, 1234567):
        v = _tricky_vertices(rng, n_v)
        frames[number] = v
        path = writer.write(number, v)
        assert os.path.basename(path) == f"{number:06d}.{fmt}"
    files = sorted(os.listdir(tmp_path / "seq"))
    assert files == sorted(f"{k:06d}.{fmt}" for k in frames)  # no temp files left
    read = read_obj if fmt == "obj" else read_ply
    for number, v in frames.items():
        got_v, got_t = read(tmp_path / "seq" / f"{number:06d}.{fmt}")
        assert got_v.shape == v.shape and got_t.shape == tri.shape
        np.testing.assert_array_equal(got_t, tri)
        if fmt == "ply":
            np.testing.assert_array_equal(got_v, v)
        else:
            np.testing.assert_allclose(got_v, v, rtol=0, atol=0.5e-4 + 1e-5 * np.abs(v).max())
            small = np.abs(v) < 1000.0
            assert np.all(np.abs(got_v - v)[small] <= 0.5e-4 + 1e-6)


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_mesh_bad_input_leaves_nothing(tmp_path, fmt):
    tri = np.array([[0, 1, 2]])
    writer = MeshSequenceWriter(tmp_path, tri, fmt)
    with pytest.raises(ValueError):
        writer.write(0, np.zeros((2, 3)))  # fewer vertices than indexed
    if fmt == "obj":
        with pytest.raises(ValueError):
            writer.write(0, np.array([[0, 0, 0], [1, np.nan, 0], [0, 1, 0]]))
    assert os.listdir(tmp_path) == []


def test_mesh_write_timing(tmp_path):
    """Prints the write time for a face-model-sized mesh; asserts nothing on it."""
    rng = np.random.default_rng(3)
    n_v, n_t = 26719, 52220
    v = rng.uniform(-15.0, 15.0, (n_v, 3)).astype(np.float32)
    tri = _triangles(rng, n_v, n_t)
    for fmt in ("obj", "ply"):
        writer = MeshSequenceWriter(tmp_path / fmt, tri, fmt)
        writer.write(0, v)  # numba load/compile
        times = []
        for k in range(1, 11):
            t0 = time.perf_counter()
            writer.write(k, v)
            times.append(time.perf_counter() - t0)
        print(f"\n{fmt}: {n_v} vertices {n_t} triangles: median {np.median(times) * 1e3:.2f} ms")


# ---------------------------------------------------------------- track


def _camera():
    return np.array([[800.0, 0.0, 320.0], [0.0, 800.0, 240.0], [0.0, 0.0, 1.0]])


def test_track_round_trip_with_missing_face(tmp_path):
    path = tmp_path / "track.npz"
    rng = np.random.default_rng(4)
    frames = []
    with TrackWriter(path, _camera(), (640, 480), n_expression=53) as w:
        for k in range(4):
            found = k != 2
            f = dict(
                blendshapes=rng.random(52), expression=rng.random(53),
                rotation=np.eye(3) * (k + 1), translation=[1.0, 2.0, 50.0 + k],
                landmarks68=rng.random((68, 2)) * 640,
            )
            frames.append((found, f))
            # The missing frame passes only some values: all are stored as NaN.
            w.add(10 + k, k / 30.0, found, **(f if found else {"landmarks68": f["landmarks68"]}))
        w.set_identity(np.arange(100) / 100.0)

    t = load_track(path)
    expected = {
        "frame_index": ((4,), np.int64), "time_s": ((4,), np.float64),
        "face_found": ((4,), np.bool_), "blendshapes": ((4, 52), np.float32),
        "blendshape_names": ((52,), None), "expression": ((4, 53), np.float32),
        "identity": ((100,), np.float32), "rotation": ((4, 3, 3), np.float32),
        "translation": ((4, 3), np.float32), "camera_matrix": ((3, 3), np.float64),
        "landmarks68": ((4, 68, 2), np.float32), "image_size": ((2,), np.int64),
        "identity_per_frame": ((4, 60), np.float32), "eyes_ypr_rad": ((4, 2, 3), np.float32),
        "fps": ((), np.float64), "decoded": ((4,), np.bool_), "confidence": ((4,), np.float32),
        "depth_residual_mm": ((4,), np.float32), "detail_scale_mm": ((), np.float64),
    }
    assert set(t) == set(expected)
    assert np.isnan(t["detail_scale_mm"])  # no --detail: NaN
    assert t["decoded"].all() and np.isnan(t["confidence"]).all()  # defaults: decoded, no confidence given
    assert np.isnan(t["depth_residual_mm"]).all()  # no depth: NaN
    assert np.isnan(t["identity_per_frame"]).all()  # no frame passed its identity
    assert np.isnan(t["eyes_ypr_rad"]).all() and np.isnan(t["fps"])  # none given: NaN, not invented
    for name, (shape, dtype) in expected.items():
        assert t[name].shape == shape, name
        if dtype is not None:
            assert t[name].dtype == dtype, name
    assert t["blendshape_names"].dtype.kind == "U"
    assert tuple(t["blendshape_names"]) == ARKIT_NAMES
    np.testing.assert_array_equal(t["frame_index"], [10, 11, 12, 13])
    np.testing.assert_allclose(t["time_s"], np.arange(4) / 30.0)
    np.testing.assert_array_equal(t["face_found"], [True, True, False, True])
    np.testing.assert_array_equal(t["image_size"], [640, 480])
    np.testing.assert_array_equal(t["camera_matrix"], _camera())
    np.testing.assert_allclose(t["identity"], np.arange(100) / 100.0, rtol=1e-6)
    for name in ("blendshapes", "expression", "rotation", "translation", "landmarks68"):
        assert np.all(np.isnan(t[name][2])), name
        for k in (0, 1, 3):
            np.testing.assert_allclose(t[name][k], np.asarray(frames[k][1][name], np.float32))
    assert sorted(os.listdir(tmp_path)) == ["track.npz"]


def test_track_marks_undecodable_frames_and_keeps_confidence_with_a_face(tmp_path):
    path = tmp_path / "track.npz"
    face = dict(blendshapes=np.full(52, 0.1), rotation=np.eye(3), translation=[0.0, 0.0, 50.0])
    with TrackWriter(path, _camera(), (640, 480)) as w:
        w.add(0, 0.0, True, confidence=1.0, **face)
        w.add(1, 0.04, False, decoded=False, confidence=0.3)  # no picture: no face, nothing kept
        w.add(2, 0.08, True, confidence=0.45, **face)         # followed through a profile
    t = load_track(path)
    np.testing.assert_array_equal(t["decoded"], [True, False, True])
    np.testing.assert_allclose(t["confidence"], [1.0, np.nan, 0.45])
    np.testing.assert_allclose(t["time_s"], [0.0, 0.04, 0.08])


def test_track_checkpoint_before_close(tmp_path):
    path = tmp_path / "track.npz"
    w = TrackWriter(path, None, None, checkpoint_every_s=3600.0)
    w.add(0, 0.0, True, blendshapes=np.full(52, 0.5))
    # The first add saves at once; later ones wait for the interval.
    t = load_track(path)
    assert len(t["frame_index"]) == 1 and t["blendshapes"][0, 0] == np.float32(0.5)
    assert np.all(np.isnan(t["camera_matrix"])) and list(t["image_size"]) == [0, 0]
    assert t["identity"].shape == (0,)
    w.add(1, 1 / 30.0, False)
    assert len(load_track(path)["frame_index"]) == 1
    w.checkpoint_every_s = 0.0
    w.CHECKPOINT_COST_RATIO = 0.0  # no stretching by save duration: save on every add
    w.set_camera(_camera(), (1280, 720))
    for k in range(2, 200):  # also grows the buffers past their first size
        w.add(k, k / 30.0, True, translation=[0.0, 0.0, float(k)])
    t = load_track(path)
    assert len(t["frame_index"]) == 200
    assert list(t["image_size"]) == [1280, 720]
    assert t["translation"][199, 2] == 199.0 and np.isnan(t["translation"][0, 2])
    w.close()
    w.close()
    with pytest.raises(ValueError):
        w.add(200, 0.0, False)
    assert sorted(os.listdir(tmp_path)) == ["track.npz"]


def test_track_checkpoint_interval_stretches_with_save_time(tmp_path):
    path = tmp_path / "track.npz"
    w = TrackWriter(path, _camera(), (640, 480), checkpoint_every_s=0.0)
    w.CHECKPOINT_COST_RATIO = 1e6  # any save duration then means hours
    w.add(0, 0.0, True)
    w.add(1, 0.1, True)
    assert len(load_track(path)["frame_index"]) == 1
    w.close()
    assert len(load_track(path)["frame_index"]) == 2


def test_track_rejects_bad_shapes(tmp_path):
    w = TrackWriter(tmp_path / "t.npz", _camera(), (640, 480), n_expression=10)
    with pytest.raises(ValueError):
        w.add(0, 0.0, True, expression=np.zeros(53))
    with pytest.raises(ValueError):
        TrackWriter(tmp_path / "u.npz", np.eye(2), (640, 480))


def test_background_mesh_writer_writes_every_mesh_and_reports_errors(tmp_path):
    from capture.sinks import BackgroundMeshWriter, MeshSequenceWriter, read_ply

    tris = np.array([[0, 1, 2], [0, 2, 3]])
    writer = BackgroundMeshWriter(MeshSequenceWriter(tmp_path, tris, "ply"), queue_size=2)
    verts = np.random.default_rng(0).normal(size=(20, 4, 3)).astype(np.float32)
    for i, v in enumerate(verts):
        writer.write(i, v)
    writer.close()
    for i, v in enumerate(verts):
        got, _ = read_ply(tmp_path / f"{i:06d}.ply")
        np.testing.assert_array_equal(got, v)

    bad = BackgroundMeshWriter(MeshSequenceWriter(tmp_path / "obj", tris, "obj"))
    bad.write(0, np.full((4, 3), np.nan, np.float32))  # OBJ refuses NaN vertices, on the thread
    with pytest.raises(ValueError):
        for i in range(1, 50):  # raised by a later write, or at the latest by close
            bad.write(i, verts[0])
        bad.close()
