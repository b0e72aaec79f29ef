"""engine.model_import: FaceXModel folder <-> face model archive."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


from engine.facemodel import DEFAULT_FACE_MODEL, FaceModel
from engine.model_import import (
    ARCHIVE_KEYS,
    ModelImportError,
    export_facexmodel,
    import_facexmodel,
    read_obj_mesh,
    read_obj_vertices,
)

# A tiny "FaceXModel": 6 vertices, a quad and a pentagon in M_Skin, a triangle in M_Eye.
NEUTRAL = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 1.5, 0.25], [2, 0.5, -0.125]], dtype=np.float64
)
UV = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.75], [2.25, 0.5], [0.125, 0.875]])
VERTEX_INDICES_TEXT = '{\n    "expressions": ["jawOpen", "eyeBlink_L", "eyeBlink_R"],\n  "idx_to_landmark_verts": [0,1, 2]\n}\n'


def _write_obj(path: Path, vertices: np.ndarray, faces: str = "") -> None:
    lines = ["# test mesh", "mtllib test.mtl", "o head"]
    lines += ["v " + " ".join(repr(float(x)) for x in v) for v in vertices]
    path.write_text("\n".join(lines) + "\n" + faces)


NEUTRAL_FACES = "\n".join(
    [
        *(f"vt {u} {v}" for u, v in UV),
        "vn 0 0 1",
        "usemtl M_Skin",
        "s 1",
        "f 1/1/1 2/2/1 3/3/1 4/4/1",  # quad
        "usemtl M_Eye",
        "f 2//1 6//1 3//1",  # triangle, v//vn: no uv
        "usemtl M_Skin",
        "f -6/-7 -4/-5 -3/-3 5/5 4/4",  # pentagon, negative (relative) indices, v/vt
        "",
    ]
)

IDENTITY_OFFSETS = [0.1, -0.2]
EXPRESSION_OFFSETS = {"eyeBlink_L": 0.01, "eyeBlink_R": -0.02, "jawOpen": 0.3}


def _tiny_folder(root: Path, with_json: bool = True) -> Path:
    folder = root / "FaceXModel"
    folder.mkdir()
    _write_obj(folder / "generic_neutral_mesh.obj", NEUTRAL, NEUTRAL_FACES)
    rows = np.arange(len(NEUTRAL), dtype=np.float64)[:, None]
    for k, off in enumerate(IDENTITY_OFFSETS):
        _write_obj(folder / f"identity{k:03d}.obj", NEUTRAL + off * (rows + 1) * [1, 2, 3], NEUTRAL_FACES)
    for name, off in EXPRESSION_OFFSETS.items():
        _write_obj(folder / f"{name}.obj", NEUTRAL + off * rows * [3, 2, 1])
    if with_json:
        (folder / "vertex_indices.json").write_text(VERTEX_INDICES_TEXT)
    return folder


def test_tiny_folder(tmp_path):
    folder = _tiny_folder(tmp_path)
    calls = []
    out = import_facexmodel(folder, tmp_path / "out" / "model.npz", progress=lambda d, t: calls.append((d, t)))
    assert out == tmp_path / "out" / "model.npz"
    assert calls == [(i, 6) for i in range(1, 7)]
    with np.load(out, allow_pickle=False) as d:
        assert list(d.files) == list(ARCHIVE_KEYS)
        a = {k: d[k] for k in d.files}

    np.testing.assert_array_equal(a["neutral"], NEUTRAL.astype(np.float32))
    assert a["neutral"].dtype == np.float32 and a["uv"].dtype == np.float32
    np.testing.assert_array_equal(a["uv"], UV.astype(np.float32))
    # quad (0,1,2,3) -> (0,1,2), (0,2,3); pentagon (0,2,3,4,3)... fan from the first corner
    np.testing.assert_array_equal(a["triangles"], [[0, 1, 2], [0, 2, 3], [1, 5, 2], [0, 2, 3], [0, 3, 4], [0, 4, 3]])
    np.testing.assert_array_equal(a["triangle_uv"], [[0, 1, 2], [0, 2, 3], [-1, -1, -1], [0, 2, 4], [0, 4, 4], [0, 4, 3]])
    assert a["triangles"].dtype == np.int32 and a["triangle_uv"].dtype == np.int32
    np.testing.assert_array_equal(a["triangle_material"], [0, 0, 1, 0, 0, 0])
    assert a["triangle_material"].dtype == np.int16
    assert list(a["materials"]) == ["M_Skin", "M_Eye"]

    assert list(a["identity_names"]) == ["identity000", "identity001"]
    assert list(a["expression_names"]) == ["jawOpen", "eyeBlink_L", "eyeBlink_R"]  # the json's order
    assert a["identity_modes"].dtype == np.float16 and a["identity_modes"].shape == (2, 6, 3)
    assert a["expression_modes"].dtype == np.float16 and a["expression_modes"].shape == (3, 6, 3)
    rows = np.arange(6, dtype=np.float64)[:, None]
    for k, off in enumerate(IDENTITY_OFFSETS):
        want = ((NEUTRAL + off * (rows + 1) * [1, 2, 3]) - NEUTRAL).astype(np.float16)
        np.testing.assert_array_equal(a["identity_modes"][k], want)
    for k, name in enumerate(a["expression_names"]):
        want = ((NEUTRAL + EXPRESSION_OFFSETS[name] * rows * [3, 2, 1]) - NEUTRAL).astype(np.float16)
        np.testing.assert_array_equal(a["expression_modes"][k], want)

    assert a["vertex_indices_json"].shape == ()
    assert str(a["vertex_indices_json"]) == json.dumps(json.loads(VERTEX_INDICES_TEXT))

    model = FaceModel.load(out)
    assert model.expression_names == ("jawOpen", "eyeBlink_L", "eyeBlink_R")
    np.testing.assert_array_equal(model.landmark68_vertices, [0, 1, 2])


def test_tiny_folder_without_expression_list(tmp_path):
    folder = _tiny_folder(tmp_path, with_json=False)
    (folder / "vertex_indices.json").write_text('{"idx_to_landmark_verts": [0]}')
    import_facexmodel(folder, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as d:
        assert list(d["expression_names"]) == ["eyeBlink_L", "eyeBlink_R", "jawOpen"]  # sorted file stems
        assert list(d["identity_names"]) == ["identity000", "identity001"]


def test_tiny_round_trip(tmp_path):
    folder = _tiny_folder(tmp_path)
    first = import_facexmodel(folder, tmp_path / "a.npz")
    export_facexmodel(first, tmp_path / "exported")
    second = import_facexmodel(tmp_path / "exported", tmp_path / "b.npz")
    with np.load(first) as a, np.load(second) as b:
        for k in ARCHIVE_KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.skipif(not DEFAULT_FACE_MODEL.is_file(), reason="shared face model not present")
def test_round_trip_shared_model_subset(tmp_path):
    names = ["eyeBlink_L", "jawOpen", "mouthSmile_R"]
    folder = export_facexmodel(DEFAULT_FACE_MODEL, tmp_path / "facex", identity_count=2, expression_names=names)
    out = import_facexmodel(folder, tmp_path / "model.npz")
    with np.load(DEFAULT_FACE_MODEL) as ref, np.load(out) as got:
        assert list(got.files) == list(ARCHIVE_KEYS)
        for k in ("neutral", "triangles", "uv", "triangle_uv", "triangle_material", "materials"):
            assert got[k].dtype == ref[k].dtype, k
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        assert list(got["identity_names"]) == ["identity000", "identity001"]
        assert list(got["expression_names"]) == names
        assert got["identity_modes"].dtype == np.float16
        idx = [list(ref["expression_names"]).index(n) for n in names]
        want_id, want_ex = ref["identity_modes"][:2], ref["expression_modes"][idx]
        # float16 rounding at most; the export is in fact exact, signed zeros included
        np.testing.assert_allclose(got["identity_modes"], want_id, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(got["expression_modes"], want_ex, rtol=1e-3, atol=1e-3)
        assert np.array_equal(got["identity_modes"].view(np.uint16), want_id.view(np.uint16))
        assert np.array_equal(got["expression_modes"].view(np.uint16), want_ex.view(np.uint16))
        cfg_ref, cfg_got = json.loads(str(ref["vertex_indices_json"])), json.loads(str(got["vertex_indices_json"]))
        assert cfg_got["expressions"] == names
        assert cfg_got["idx_to_landmark_verts"] == cfg_ref["idx_to_landmark_verts"]


def test_obj_face_forms(tmp_path):
    p = tmp_path / "m.obj"
    p.write_text(
        "v 0 0 0\nv 1 0 0\nv 1 1 0 1.0\nv\t0 1 0\r\nvt 0 0\nvt 1 0\nvt 1 1\n"
        "f 1 2 3\nf 1/1 2/2 3/3 4/1\nf 1//1 3//1 4//1\nf -4/-3/1 -3/-2/1 -2/-1/1\n"
    )
    m = read_obj_mesh(p)
    np.testing.assert_array_equal(m.vertices, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(m.triangles, [[0, 1, 2], [0, 1, 2], [0, 2, 3], [0, 2, 3], [0, 1, 2]])
    np.testing.assert_array_equal(m.triangle_uv, [[-1, -1, -1], [0, 1, 2], [0, 2, 0], [-1, -1, -1], [0, 1, 2]])
    assert m.materials == ("default",)


def test_read_obj_vertices_only(tmp_path):
    p = tmp_path / "m.obj"
    p.write_bytes(b"v 1 2 3\r\nvt 0.5 0.5\r\nvn 0 0 1\r\nv\t4  5 6\r\nf 1 2 1\r\n# v 9 9 9\r\nv -7e-1 8E0 9.\r\nf 1 2 3")
    np.testing.assert_array_equal(read_obj_vertices(p), [[1, 2, 3], [4, 5, 6], [-0.7, 8, 9]])
    p.write_text("# nothing\nvt 0 0\n")
    assert read_obj_vertices(p).shape == (0, 3)
    p.write_text("v 1 2\n")
    with pytest.raises(ModelImportError, match=r"m\.obj: malformed 'v' entry #1"):
        read_obj_vertices(p)


def test_errors(tmp_path):
    with pytest.raises(ModelImportError, match="not found.*nowhere"):
        import_facexmodel(tmp_path / "nowhere", tmp_path / "m.npz")

    folder = _tiny_folder(tmp_path)
    _write_obj(folder / "eyeBlink_R.obj", NEUTRAL[:-1])
    with pytest.raises(ModelImportError, match=r"eyeBlink_R\.obj: 5 vertices, expected 6") as exc:
        import_facexmodel(folder, tmp_path / "m.npz")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "m.npz").exists()

    (folder / "eyeBlink_R.obj").unlink()
    with pytest.raises(ModelImportError, match=r"eyeBlink_R\.obj is missing"):
        import_facexmodel(folder, tmp_path / "m.npz")

    (folder / "vertex_indices.json").write_text('{"expressions": []}')
    with pytest.raises(ModelImportError, match="no expression OBJs"):
        import_facexmodel(folder, tmp_path / "m.npz")

    (folder / "identity001.obj").rename(folder / "identity002.obj")
    with pytest.raises(ModelImportError, match=r"identity001\.obj is missing"):
        import_facexmodel(folder, tmp_path / "m.npz")

    (folder / "generic_neutral_mesh.obj").unlink()
    with pytest.raises(ModelImportError, match=r"generic_neutral_mesh\.obj is missing"):
        import_facexmodel(folder, tmp_path / "m.npz")

    bad = tmp_path / "bad.obj"
    bad.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 7\n")
    with pytest.raises(ModelImportError, match=r"bad\.obj: line 4: vertex index 7 out of range"):
        read_obj_mesh(bad)
