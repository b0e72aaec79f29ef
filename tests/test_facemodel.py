"""engine.facemodel: loading the model archive, vertices (numpy and torch), model path resolution."""
from __future__ import annotations

import json

import numpy as np
import pytest


from engine.facemodel import (
    DEFAULT_FACE_MODEL,
    ENV_FACE_MODEL,
    FACE_VERTICES,
    FaceModel,
    FaceModelError,
    barycentric_points,
    model_vertices,
    model_vertices_torch,
    resolve_face_model_path,
)



# ---------------------------------------------------------------- loading


def test_load_shapes_and_dtypes(model):
    V, T = 26719, 52220
    assert model.neutral.shape == (V, 3) and model.neutral.dtype == np.float32
    assert model.triangles.shape == (T, 3) and model.triangles.dtype == np.int32
    assert model.identity_modes.shape == (100, V, 3) and model.identity_modes.dtype == np.float32
    assert model.expression_modes.shape == (53, V, 3) and model.expression_modes.dtype == np.float32
    assert model.uv.shape == (28911, 2) and model.uv.dtype == np.float32
    assert model.triangle_uv.shape == (T, 3) and model.triangle_uv.dtype == np.int32
    assert model.triangle_material.shape == (T,) and model.triangle_material.dtype == np.int16
    assert model.landmark68_vertices.shape == (68,) and model.landmark68_vertices.dtype == np.int64
    assert len(model.expression_names) == 53 and all(isinstance(n, str) for n in model.expression_names)
    assert len(set(model.expression_names)) == 53
    assert model.materials[0] == "M_Face" and len(model.materials) == 12
    assert (model.n_vertices, model.n_identity, model.n_expression) == (V, 100, 53)
    # indices stay inside their arrays
    assert model.triangles.min() >= 0 and model.triangles.max() < V
    assert model.triangle_uv.min() >= 0 and model.triangle_uv.max() < len(model.uv)
    assert model.triangle_material.min() >= 0 and model.triangle_material.max() < len(model.materials)
    assert np.all(np.isin(model.landmark68_vertices, np.arange(FACE_VERTICES.stop)))
    assert np.isfinite(model.neutral).all() and np.isfinite(model.expression_modes).all()


def test_model_units_and_axes(model):
    """Centimetres, +y up, looking down +z: the face is ~15-20 cm wide, the nose tip is the front."""
    face = model.neutral[: FACE_VERTICES.stop]
    width = np.ptp(face[:, 0])
    assert 12.0 < width < 25.0
    nose_tip = model.neutral[model.landmark68_vertices[30]]   # iBUG 31: nose tip
    chin = model.neutral[model.landmark68_vertices[8]]        # iBUG 9: chin
    brow = model.neutral[model.landmark68_vertices[19]]       # iBUG 20: brow
    assert brow[1] > nose_tip[1] > chin[1]                    # +y up
    assert nose_tip[2] > brow[2] and nose_tip[2] > chin[2]    # the face looks down +z
    assert abs(nose_tip[0]) < 0.5                             # on the symmetry plane


# ---------------------------------------------------------------- vertices


def test_vertices_is_neutral_plus_weighted_modes(model):
    rng = np.random.default_rng(1)
    identity = rng.normal(0.0, 1.0, 7)
    expression = np.zeros(model.n_expression)
    expression[[3, 10, 26]] = [0.25, 1.0, 0.6]
    v = model.vertices(identity, expression)
    manual = model.neutral.astype(np.float64).copy()
    for k, a in enumerate(identity):
        manual += a * model.identity_modes[k]
    for m, a in enumerate(expression):
        manual += a * model.expression_modes[m]
    assert v.shape == (model.n_vertices, 3)
    np.testing.assert_allclose(v, manual, atol=1e-4)
    # no weights: the neutral mesh, and the model's arrays are not modified
    np.testing.assert_array_equal(model.vertices(), model.neutral)
    assert model.vertices() is not model.neutral


def test_vertices_identity_or_expression_alone(model):
    e = np.zeros(model.n_expression)
    e[model.expression_names.index("jawOpen")] = 1.0
    np.testing.assert_allclose(model.vertices(None, e),
                               model.neutral + model.expression_modes[model.expression_names.index("jawOpen")],
                               atol=1e-5)
    np.testing.assert_allclose(model.vertices(np.array([0.0, 2.0])), model.neutral + 2.0 * model.identity_modes[1],
                               atol=1e-5)
    # an empty identity is the neutral identity
    np.testing.assert_array_equal(model.vertices(np.zeros(0)), model.neutral)


def test_model_vertices_torch_matches_numpy_and_has_gradients(model):
    torch = pytest.importorskip("torch")
    arrays = model.torch_arrays()
    assert arrays["neutral"].dtype == torch.float32
    rng = np.random.default_rng(2)
    ident = rng.normal(0.0, 1.0, (2, 20))
    expr = rng.uniform(0.0, 1.0, (2, model.n_expression)) * (rng.uniform(size=(2, model.n_expression)) < 0.2)
    id_t = torch.tensor(ident, dtype=torch.float32, requires_grad=True)
    ex_t = torch.tensor(expr, dtype=torch.float32, requires_grad=True)
    v = model_vertices_torch(arrays["neutral"], arrays["identity_modes"], arrays["expression_modes"], id_t, ex_t)
    assert tuple(v.shape) == (2, model.n_vertices, 3)
    for b in range(2):
        ref = model.vertices(ident[b], expr[b])
        assert np.abs(v[b].detach().numpy() - ref).max() < 1e-4  # cm

    # vector-Jacobian product with a random cotangent G: dL/de[b, m] = Σ G[b] · mode[m]
    G = torch.tensor(rng.normal(size=(2, model.n_vertices, 3)), dtype=torch.float32)
    g_e, g_id = torch.autograd.grad((v * G).sum(), (ex_t, id_t))
    Gn = G.numpy().astype(np.float64)
    want_e = np.einsum("bvc,mvc->bm", Gn, model.expression_modes.astype(np.float64))
    want_id = np.einsum("bvc,kvc->bk", Gn, model.identity_modes[:20].astype(np.float64))
    np.testing.assert_allclose(g_e.numpy(), want_e, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(g_id.numpy(), want_id, rtol=1e-3, atol=1e-2)

    # d vertices / d expression[m] is exactly expression mode m (the model is linear)
    m = model.expression_names.index("eyeBlink_L")
    ex1 = torch.tensor(expr[:1], dtype=torch.float32, requires_grad=True)
    v1 = model_vertices_torch(arrays["neutral"], arrays["identity_modes"], arrays["expression_modes"],
                              torch.zeros(1, 5), ex1)
    vids = np.flatnonzero(np.abs(model.expression_modes[m]).sum(axis=1) > 0.1)[:5]
    for vid in vids:
        for c in range(3):
            (g,) = torch.autograd.grad(v1[0, vid, c], ex1, retain_graph=True)
            np.testing.assert_allclose(g[0].numpy(), model.expression_modes[:, vid, c], atol=1e-6)


def test_model_vertices_function_matches_method(model):
    e = np.zeros(model.n_expression)
    e[5] = 0.5
    np.testing.assert_array_equal(
        model_vertices(model.neutral, model.identity_modes, model.expression_modes, np.ones(3), e),
        model.vertices(np.ones(3), e))


# ---------------------------------------------------------------- barycentric points


def test_barycentric_points(model):
    tri_ids = np.array([0, 100, 5000])
    bary = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    p = barycentric_points(model.neutral, model.triangles, tri_ids, bary)
    assert p.shape == (3, 3)
    np.testing.assert_allclose(p[0], model.neutral[model.triangles[0, 0]], atol=1e-6)
    np.testing.assert_allclose(p[1], model.neutral[model.triangles[100, 2]], atol=1e-6)
    a, b, c = model.neutral[model.triangles[5000]].astype(np.float64)
    np.testing.assert_allclose(p[2], 0.2 * a + 0.3 * b + 0.5 * c, atol=1e-5)
    # a leading batch axis of vertex sets
    batch = np.stack([model.neutral, model.neutral + np.float32(1.0)])
    pb = barycentric_points(batch, model.triangles, tri_ids, bary)
    assert pb.shape == (2, 3, 3)
    np.testing.assert_allclose(pb[1] - pb[0], 1.0, atol=1e-5)


# ---------------------------------------------------------------- path resolution


def test_resolve_explicit_path(tmp_path, monkeypatch):
    f = tmp_path / "m.npz"
    f.write_bytes(b"x")
    monkeypatch.setenv(ENV_FACE_MODEL, str(tmp_path / "elsewhere.npz"))
    assert resolve_face_model_path(f) == f
    assert resolve_face_model_path(str(f)) == f


def test_resolve_env_var(tmp_path, monkeypatch):
    f = tmp_path / "env_model.npz"
    f.write_bytes(b"x")
    monkeypatch.setenv(ENV_FACE_MODEL, str(f))
    assert resolve_face_model_path() == f
    monkeypatch.delenv(ENV_FACE_MODEL)
    assert resolve_face_model_path() == DEFAULT_FACE_MODEL


def test_missing_file_message_names_the_option(tmp_path, monkeypatch):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FaceModelError, match="--face-model") as info:
        resolve_face_model_path(missing)
    assert str(missing) in str(info.value)
    monkeypatch.setenv(ENV_FACE_MODEL, str(missing))
    with pytest.raises(FaceModelError, match="--face-model"):
        FaceModel.load()
    with pytest.raises(FaceModelError):  # a folder is not a model file
        FaceModel.load(tmp_path)


# ---------------------------------------------------------------- malformed archives


def _tiny_archive(**override) -> dict:
    """A structurally valid 4-vertex model archive."""
    arrays = dict(
        neutral=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32),
        triangles=np.array([[0, 1, 2], [0, 2, 3]], np.int32),
        uv=np.zeros((4, 2), np.float32),
        triangle_uv=np.array([[0, 1, 2], [0, 2, 3]], np.int32),
        triangle_material=np.array([0, 1], np.int16),
        materials=np.array(["M_Face", "M_BackHead"]),
        identity_modes=np.ones((2, 4, 3), np.float16),
        identity_names=np.array(["identity000", "identity001"]),
        expression_modes=np.ones((2, 4, 3), np.float16),
        expression_names=np.array(["jawOpen", "eyeBlink_L"]),
        vertex_indices_json=np.array(json.dumps({"idx_to_landmark_verts": [0, 1, 2]})),
    )
    arrays.update(override)
    return {k: v for k, v in arrays.items() if v is not None}


def test_tiny_valid_archive_loads(tmp_path):
    f = tmp_path / "tiny.npz"
    np.savez(f, **_tiny_archive())
    m = FaceModel.load(f)
    assert m.n_vertices == 4 and m.expression_names == ("jawOpen", "eyeBlink_L")
    np.testing.assert_array_equal(m.landmark68_vertices, [0, 1, 2])


def test_garbage_bytes_raise_face_model_error(tmp_path):
    f = tmp_path / "garbage.npz"
    f.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(FaceModelError):
        FaceModel.load(f)


@pytest.mark.parametrize("missing", ["neutral", "expression_modes", "vertex_indices_json", "materials"])
def test_archive_missing_a_key_raises_face_model_error(tmp_path, missing):
    f = tmp_path / "partial.npz"
    np.savez(f, **_tiny_archive(**{missing: None}))
    with pytest.raises(FaceModelError):
        FaceModel.load(f)


@pytest.mark.parametrize("override", [
    {"identity_modes": np.ones((2, 5, 3), np.float16)},                            # wrong vertex count
    {"expression_names": np.array(["jawOpen"])},                                  # names != shapes
    {"triangles": np.array([[0, 1, 9]], np.int32)},                               # index past the end
    {"vertex_indices_json": np.array("{not json")},
])
def test_inconsistent_archive_raises_face_model_error(tmp_path, override):
    f = tmp_path / "bad.npz"
    np.savez(f, **_tiny_archive(**override))
    with pytest.raises(FaceModelError):
        FaceModel.load(f)


def test_empty_file_raises_face_model_error(tmp_path):
    """A zero-byte file (an interrupted copy) is a malformed model, not an EOFError."""
    f = tmp_path / "empty.npz"
    f.write_bytes(b"")
    with pytest.raises(FaceModelError):
        FaceModel.load(f)


def test_truncated_archive_raises_face_model_error(tmp_path):
    """The first 64 KiB of the real archive (a partial download) is a malformed model,
    not a zipfile.BadZipFile escaping to the user."""
    f = tmp_path / "truncated.npz"
    with open(resolve_face_model_path(), "rb") as src:
        f.write_bytes(src.read(65536))
    with pytest.raises(FaceModelError):
        FaceModel.load(f)


def test_material_lookups(model):
    sclera = model.material_mask("M_ScleraLeft")
    assert sclera.sum() > 0
    assert np.all(model.triangle_material[sclera] == model.materials.index("M_ScleraLeft"))
    both = model.material_mask("M_ScleraLeft", "M_ScleraRight")
    assert both.sum() == sclera.sum() + model.material_mask("M_ScleraRight").sum()
    np.testing.assert_array_equal(model.material_vertices("M_ScleraLeft"), np.unique(model.triangles[sclera]))
