"""capture.gltf_export: a synthetic take -> .glb, read back by independent readers.

pygltflib parses the file; the accessors (sparse ones included) are decoded
here with numpy from the GLB's binary chunk, not by the exporter's code.
trimesh is a second reader of the base mesh, and the Khronos glTF validator
(npm gltf-validator, via tests/gltf_validate.mjs) checks the file against the
specification when node and the package are installed.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import trimesh

from capture.gltf_export import (
    GltfExportError,
    export_gltf,
    key_frames,
    key_times_s,
    quaternions_xyzw,
    take_detail_mm,
    take_identity,
)
from capture.sinks import DetailMapWriter
from engine.arkit import ARKIT_NAMES, arkit_from_model
from engine.pose import FRONTAL, model_to_camera, rodrigues

TESTS = Path(__file__).resolve().parent
TIMES_S = np.array([0.0, 0.04, 0.08, 0.12, 0.16, 0.20])
NO_FACE = 2          # a frame without a face: no key
SYMMETRIC = 3        # a frame whose browInnerUp and cheekPuff halves are equal
YPR_DEG = [(0, 0, 0), (20, -10, 5), (0, 0, 0), (-35, 15, -10), (60, 5, 20), (-10, -20, 0)]

_COMPONENT = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def synthetic_track(model) -> dict:
    """Six frames with known expressions, head poses and positions; frame NO_FACE has no face."""
    rng = np.random.default_rng(7)
    F, M = len(TIMES_S), model.n_expression
    names = model.expression_names
    expression = rng.uniform(0.0, 0.6, (F, M)).astype(np.float32)
    for half in ("browInnerUp", "cheekPuff"):
        left, right = names.index(half + "_L"), names.index(half + "_R")
        expression[SYMMETRIC, right] = expression[SYMMETRIC, left]
    mapping = model.arkit_mapping()
    rotation = np.stack([model_to_camera(*np.radians(a)) for a in YPR_DEG]).astype(np.float32)
    translation = np.array([[1.0, -2.0, 45.0], [2.0, -1.5, 47.0], [0, 0, 0],
                            [-3.0, 0.5, 50.0], [0.5, 1.0, 40.0], [0.0, 0.0, 44.0]], np.float32)
    found = np.ones(F, bool)
    found[NO_FACE] = False
    blendshapes = arkit_from_model(expression, mapping).astype(np.float32)
    for a in (expression, rotation, translation, blendshapes):
        a[NO_FACE] = np.nan
    return {
        "frame_index": np.arange(F), "time_s": TIMES_S.copy(), "face_found": found,
        "blendshapes": blendshapes, "blendshape_names": np.array(ARKIT_NAMES), "expression": expression,
        "identity": rng.standard_normal(60).astype(np.float32),
        "rotation": rotation, "translation": translation,
        "camera_matrix": np.array([[600.0, 0, 319.5], [0, 600.0, 239.5], [0, 0, 1]]),
        "image_size": np.array([640, 480]),
    }


class Glb:
    """A .glb read with pygltflib; accessors decoded with numpy from its binary chunk."""

    def __init__(self, path: Path):
        self.path = path
        self.gltf = pygltflib.GLTF2().load(str(path))
        self.blob = self.gltf.binary_blob()

    def _view(self, index: int, dtype, count: int, offset: int = 0) -> np.ndarray:
        view = self.gltf.bufferViews[index]
        assert view.byteStride is None
        start = (view.byteOffset or 0) + offset
        assert start + count * np.dtype(dtype).itemsize <= start - offset + view.byteLength
        return np.frombuffer(self.blob, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=start)

    def accessor(self, index: int) -> np.ndarray:
        """(count, width) or (count,) values, glTF's rules: no bufferView = zeros, then sparse."""
        acc = self.gltf.accessors[index]
        width = _WIDTH[acc.type]
        dtype = _COMPONENT[acc.componentType]
        if acc.bufferView is None:
            values = np.zeros(acc.count * width, dtype)
        else:
            values = self._view(acc.bufferView, dtype, acc.count * width, acc.byteOffset or 0).copy()
        values = values.reshape(acc.count, width)
        if acc.sparse is not None:
            s = acc.sparse
            rows = self._view(s.indices.bufferView, _COMPONENT[s.indices.componentType], s.count,
                              s.indices.byteOffset or 0).astype(np.int64)
            assert np.all(np.diff(rows) > 0), "sparse indices must strictly increase"
            values[rows] = self._view(s.values.bufferView, dtype, s.count * width,
                                      s.values.byteOffset or 0).reshape(s.count, width)
        return values if width > 1 else values[:, 0]

    def node(self, name: str):
        return next(n for n in self.gltf.nodes if n.name == name)

    def node_index(self, name: str) -> int:
        return next(i for i, n in enumerate(self.gltf.nodes) if n.name == name)

    def sampler_values(self, node: str, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(input, output) of the animation channel on node/path."""
        (anim,) = self.gltf.animations
        (channel,) = [c for c in anim.channels
                      if c.target.node == self.node_index(node) and c.target.path == path]
        sampler = anim.samplers[channel.sampler]
        assert sampler.interpolation == "LINEAR"
        return self.accessor(sampler.input), self.accessor(sampler.output)

    def targets(self) -> np.ndarray:
        """(52, V, 3) morph POSITION deltas."""
        (prim,) = self.gltf.meshes[0].primitives
        return np.stack([self.accessor(t["POSITION"]) for t in prim.targets])


@pytest.fixture(scope="module")
def track(model):
    return synthetic_track(model)


@pytest.fixture(scope="module")
def exported(model, track, tmp_path_factory):
    """The synthetic take exported with sparse (default) and dense morph targets, and the progress calls."""
    folder = tmp_path_factory.mktemp("gltf")
    calls = []
    sparse = export_gltf(track, model, folder / "take.glb", progress=lambda d, t: calls.append((d, t)))
    dense = export_gltf(track, model, folder / "take_dense.glb", sparse_targets=False)
    return {"sparse": Glb(sparse), "dense": Glb(dense), "progress": calls}


@pytest.fixture(scope="module")
def glb(exported) -> Glb:
    return exported["sparse"]


def face_frames() -> np.ndarray:
    return np.array([f for f in range(len(TIMES_S)) if f != NO_FACE])


# ----------------------------------------------------------------------------
# Container and structure
# ----------------------------------------------------------------------------


def test_glb_container_is_well_formed(glb):
    data = glb.path.read_bytes()
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_len, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_len % 4 == 0
    bin_len, bin_type = struct.unpack_from("<II", data, 20 + json_len)
    assert bin_type == 0x004E4942 and bin_len % 4 == 0 and 28 + json_len + bin_len == len(data)
    assert glb.gltf.buffers[0].byteLength == bin_len == len(glb.blob)
    for view in glb.gltf.bufferViews:
        assert view.byteOffset % 4 == 0 and view.byteOffset + view.byteLength <= bin_len


def test_asset_scene_nodes_and_mesh(glb, model):
    g = glb.gltf
    assert g.asset.version == "2.0" and g.asset.generator == "capture"
    assert g.scenes[g.scene].nodes == [glb.node_index("Head"), glb.node_index("Camera")]
    head, face = glb.node("Head"), glb.node("Face")
    assert head.children == [glb.node_index("Face")] and head.mesh is None and face.mesh == 0
    (mesh,) = g.meshes
    (prim,) = mesh.primitives
    assert prim.mode == 4 and set(vars(prim.attributes)) >= {"POSITION", "NORMAL"}
    assert prim.attributes.TEXCOORD_0 is None
    indices = g.accessors[prim.indices]
    assert indices.componentType == 5125 and indices.count == model.triangles.size
    assert g.bufferViews[indices.bufferView].target == 34963
    assert g.bufferViews[g.accessors[prim.attributes.POSITION].bufferView].target == 34962
    # names where Blender/three.js (mesh) and UniGLTF (primitive) look
    assert mesh.extras["targetNames"] == list(ARKIT_NAMES)
    assert prim.extras["targetNames"] == list(ARKIT_NAMES)
    assert len(prim.targets) == 52 and mesh.weights == [0.0] * 52


def test_base_mesh_is_the_take_identity_in_metres(glb, model, track):
    (prim,) = glb.gltf.meshes[0].primitives
    positions = glb.accessor(prim.attributes.POSITION)
    expected_m = model.vertices(track["identity"]) / 100.0
    np.testing.assert_allclose(positions, expected_m, atol=1e-7)
    acc = glb.gltf.accessors[prim.attributes.POSITION]
    assert acc.min == positions.min(axis=0).tolist() and acc.max == positions.max(axis=0).tolist()
    np.testing.assert_array_equal(glb.accessor(prim.indices).reshape(-1, 3), model.triangles)


def test_normals_are_unit_and_point_out_of_the_face(glb, model):
    (prim,) = glb.gltf.meshes[0].primitives
    normals = glb.accessor(prim.attributes.NORMAL)
    positions = glb.accessor(prim.attributes.POSITION)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-6)
    skin = model.material_vertices("M_Face")
    # at the skin's extremes the normal points the way the extreme lies (glTF: counter-clockwise = front)
    for axis, sign in ((2, 1), (0, 1), (0, -1), (1, 1)):  # nose tip, left and right ear side, crown
        extreme = skin[np.argmax(sign * positions[skin, axis])]
        assert sign * normals[extreme, axis] > 0.5, (axis, sign, normals[extreme])


# ----------------------------------------------------------------------------
# Morph targets
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sparse", "dense"])
def test_mesh_from_weights_equals_the_face_model(exported, variant, model, track):
    """base + Σ w_k target_k with the file's own weights = FaceModel.vertices(identity, expression)."""
    g = exported[variant]
    (prim,) = g.gltf.meshes[0].primitives
    base = g.accessor(prim.attributes.POSITION).astype(np.float64)
    targets = g.targets().astype(np.float64)
    times, weights = g.sampler_values("Face", "weights")
    key = int(np.flatnonzero(face_frames() == SYMMETRIC)[0])
    w = weights.reshape(len(times), 52)[key]
    rebuilt_m = base + np.tensordot(w, targets, axes=1)
    expected_m = model.vertices(track["identity"], track["expression"][SYMMETRIC]).astype(np.float64) / 100.0
    err = np.abs(rebuilt_m - expected_m).max()
    assert err < 1e-6, f"{err * 1e6:.3f} µm"
    # the whole face moves (so the comparison is not vacuous): several millimetres
    assert np.abs(rebuilt_m - base).max() > 3e-3


def test_sparse_and_dense_targets_hold_the_same_deltas(exported):
    np.testing.assert_array_equal(exported["sparse"].targets(), exported["dense"].targets())
    assert exported["sparse"].path.stat().st_size < 0.7 * exported["dense"].path.stat().st_size


def test_split_shapes_are_summed_and_tongue_out_is_zero(glb, model):
    targets = glb.targets()
    names = model.expression_names
    for arkit, half in (("browInnerUp", "browInnerUp"), ("cheekPuff", "cheekPuff")):
        both = model.expression_modes[names.index(half + "_L")] + model.expression_modes[names.index(half + "_R")]
        np.testing.assert_allclose(targets[ARKIT_NAMES.index(arkit)], both / 100.0, atol=1e-8)
    np.testing.assert_allclose(targets[ARKIT_NAMES.index("jawOpen")],
                               model.expression_modes[names.index("jawOpen")] / 100.0, atol=1e-8)
    np.testing.assert_allclose(targets[ARKIT_NAMES.index("eyeBlinkLeft")],
                               model.expression_modes[names.index("eyeBlink_L")] / 100.0, atol=1e-8)
    assert not targets[ARKIT_NAMES.index("tongueOut")].any()
    for i, t in enumerate(glb.gltf.meshes[0].primitives[0].targets):  # min/max as stored
        acc = glb.gltf.accessors[t["POSITION"]]
        assert acc.min == targets[i].min(axis=0).tolist() and acc.max == targets[i].max(axis=0).tolist()


# ----------------------------------------------------------------------------
# Animation
# ----------------------------------------------------------------------------


def test_keys_skip_the_frame_without_a_face(glb):
    times, _ = glb.sampler_values("Face", "weights")
    np.testing.assert_allclose(times, TIMES_S[face_frames()], atol=1e-7)
    acc = glb.gltf.accessors[glb.gltf.animations[0].samplers[0].input]
    assert acc.min == [float(times.min())] and acc.max == [float(times.max())]
    assert np.all(np.diff(times) > 0)


def test_weights_are_the_tracks_blendshapes(glb, track):
    times, weights = glb.sampler_values("Face", "weights")
    np.testing.assert_array_equal(weights.reshape(len(times), 52), track["blendshapes"][face_frames()])


def test_head_rotation_and_translation_follow_the_take(glb, track):
    _, q = glb.sampler_values("Head", "rotation")
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    assert np.all(np.einsum("ij,ij->i", q[1:], q[:-1]) > 0), "quaternion keys must be sign-continuous"
    for key, frame in enumerate(face_frames()):
        expected = FRONTAL @ track["rotation"][frame].astype(np.float64)
        np.testing.assert_allclose(quaternion_matrix(q[key]), expected, atol=1e-6)
    _, position_m = glb.sampler_values("Head", "translation")
    t_cm = track["translation"][face_frames()].astype(np.float64)
    np.testing.assert_allclose(position_m, (t_cm - t_cm[0]) @ FRONTAL.T / 100.0, atol=1e-6)


def test_camera_sees_the_head_where_the_video_did(glb, track, model):
    """Model vertex -> scene (Head then Face node) -> camera node = FRONTAL·(R·v + t), the video's camera."""
    camera = glb.node("Camera")
    (cam,) = glb.gltf.cameras
    np.testing.assert_allclose(cam.perspective.yfov, 2 * np.arctan(240 / 600), rtol=1e-9)
    np.testing.assert_allclose(cam.perspective.aspectRatio, 640 / 480, rtol=1e-9)
    _, q = glb.sampler_values("Head", "rotation")
    _, position_m = glb.sampler_values("Head", "translation")
    key, frame = 2, face_frames()[2]
    v_m = model.vertices(track["identity"])[:50].astype(np.float64) / 100.0
    scene_m = v_m @ quaternion_matrix(q[key]).T + position_m[key]
    seen_m = scene_m - np.array(camera.translation)
    camera_cm = v_m * 100 @ track["rotation"][frame].T.astype(np.float64) + track["translation"][frame]
    np.testing.assert_allclose(seen_m, camera_cm @ FRONTAL.T / 100.0, atol=1e-6)


def test_progress_counts_up_to_its_total(exported):
    calls = exported["progress"]
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1][0] == calls[-1][1] and len(calls) > 50


# ----------------------------------------------------------------------------
# Helpers and edge cases
# ----------------------------------------------------------------------------


def quaternion_matrix(q) -> np.ndarray:
    """(x, y, z, w) -> 3x3 rotation, the textbook formula."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def test_quaternions_round_trip_and_stay_continuous_through_a_full_turn():
    rng = np.random.default_rng(3)
    random = np.stack([rodrigues(rng.normal(size=3) * 1.5) for _ in range(200)])
    turn = np.stack([rodrigues(np.array([0.3, 1.0, -0.2]) / 1.063 * a) for a in np.linspace(0, 2 * np.pi, 73)])
    for rotations in (random, turn):
        q = quaternions_xyzw(rotations)
        for qi, R in zip(q, rotations):
            np.testing.assert_allclose(quaternion_matrix(qi), R, atol=1e-12)
    assert np.all(np.einsum("ij,ij->i", q[1:], q[:-1]) > 0)
    assert q[0, 3] > 0


def test_photo_takes_get_increasing_key_times():
    photos = {"time_s": np.zeros(3), "frame_index": np.arange(3)}
    np.testing.assert_array_equal(key_times_s(photos, np.arange(3)), [0.0, 1.0, 2.0])
    with_fps = dict(photos, fps=np.float64(10.0))
    np.testing.assert_allclose(key_times_s(with_fps, np.array([0, 2])), [0.0, 0.2], atol=1e-7)


def test_a_take_without_a_face_is_an_error(model, track, tmp_path):
    empty = dict(track, face_found=np.zeros(len(TIMES_S), bool))
    with pytest.raises(GltfExportError, match="no frame with a face"):
        export_gltf(empty, model, tmp_path / "x.glb")
    wrong_model = dict(track, identity=np.zeros(model.n_identity + 1, np.float32))
    with pytest.raises(GltfExportError, match="identity"):
        export_gltf(wrong_model, model, tmp_path / "x.glb")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------
# Other readers
# ----------------------------------------------------------------------------


def test_trimesh_reads_the_base_mesh(glb, model, track):
    scene = trimesh.load(str(glb.path), process=False)
    (mesh,) = scene.geometry.values()
    assert mesh.vertices.shape == (model.n_vertices, 3) and mesh.faces.shape == model.triangles.shape
    expected_m = model.vertices(track["identity"]) / 100.0
    np.testing.assert_allclose(mesh.bounds, [expected_m.min(0), expected_m.max(0)], atol=1e-6)
    assert 0.15 < mesh.extents[0] < 0.40  # a head is a couple of decimetres wide, not 20 m


def _validator() -> tuple[str, Path] | None:
    node = shutil.which("node")
    package = Path(os.environ.get("GLTF_VALIDATOR", TESTS / "node_modules" / "gltf-validator"))
    return (node, package) if node and (package / "package.json").is_file() else None


def _validate(path: Path) -> dict:
    node, package = _validator()
    out = subprocess.run([node, str(TESTS / "gltf_validate.mjs"), str(path)], check=False,
                         capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, GLTF_VALIDATOR=str(package)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(_validator() is None, reason="needs node and the npm package gltf-validator in "
                    "tests/node_modules (npm install --prefix tests gltf-validator) or $GLTF_VALIDATOR")
@pytest.mark.parametrize("variant", ["plain", "detail"])
def test_khronos_validator_finds_no_errors(glb, detailed, variant, tmp_path):
    glb = detailed["glb"] if variant == "detail" else glb
    report = _validate(glb.path)
    issues = report["issues"]
    print(f"gltf-validator {report['validatorVersion']}: {issues['numErrors']} errors, "
          f"{issues['numWarnings']} warnings, {issues['numInfos']} infos")
    assert issues["numErrors"] == 0, issues["messages"][:5]
    assert report["info"]["hasMorphTargets"] and report["info"]["animationCount"] == 1
    # and it does catch a broken file: a POSITION max that is not the data's
    broken = tmp_path / "broken.glb"
    broken.write_bytes(_with_json(glb.path.read_bytes(), _wrong_position_max))
    assert _validate(broken)["issues"]["numErrors"] > 0


def _wrong_position_max(gltf: dict) -> None:
    acc = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    acc["max"][1] += 0.01


def _with_json(data: bytes, edit) -> bytes:
    """The GLB with its JSON chunk edited (re-padded; the binary chunk unchanged)."""
    (json_len,) = struct.unpack_from("<I", data, 12)
    gltf = json.loads(data[20:20 + json_len])
    edit(gltf)
    text = json.dumps(gltf).encode()
    text += b" " * (-len(text) % 4)
    rest = data[20 + json_len:]
    return struct.pack("<III", 0x46546C67, 2, 20 + len(text) + len(rest)) + \
        struct.pack("<II", len(text), 0x4E4F534A) + text + rest


# ----------------------------------------------------------------------------
# Skin detail as a normal texture
# ----------------------------------------------------------------------------

DETAIL_PX = 128


def ripples_mm(resolution: int = DETAIL_PX) -> np.ndarray:
    """A displacement map sloped along both u and v (0.3 mm ripples across v, 0.2 mm along u)."""
    rows, cols = np.mgrid[:resolution, :resolution]
    return (0.3 * np.sin(rows / 2.0) + 0.2 * np.cos(cols / 2.5)).astype(np.float32)


@pytest.fixture(scope="module")
def detailed(model, track, tmp_path_factory) -> dict:
    path = export_gltf(track, model, tmp_path_factory.mktemp("detail") / "take.glb", detail_mm=ripples_mm())
    return {"glb": Glb(path), "detail_mm": ripples_mm()}


def _texture_rgb(glb: Glb) -> np.ndarray:
    import cv2
    (image,) = glb.gltf.images
    assert image.mimeType == "image/png"
    view = glb.gltf.bufferViews[image.bufferView]
    data = glb.blob[view.byteOffset:view.byteOffset + view.byteLength]
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


def test_detail_splits_the_head_into_skin_with_a_normal_texture_and_the_rest(detailed, glb, model):
    doc = detailed["glb"].gltf
    skin, rest = doc.meshes[0].primitives
    assert doc.materials[skin.material].normalTexture.index == 0
    assert doc.materials[rest.material].normalTexture is None
    assert doc.textures[0].source == 0 and _texture_rgb(detailed["glb"]).shape == (DETAIL_PX, DETAIL_PX, 3)
    tri = [detailed["glb"].accessor(p.indices).reshape(-1, 3) for p in (skin, rest)]
    on_face = model.material_mask("M_Face")
    assert np.array_equal(tri[0], model.triangles[on_face]) and np.array_equal(tri[1], model.triangles[~on_face])
    # both primitives share the vertices and the morph targets of the plain export
    for p in (skin, rest):
        assert p.attributes.POSITION == skin.attributes.POSITION and p.targets == skin.targets
        assert p.extras["targetNames"] == list(ARKIT_NAMES)
    np.testing.assert_array_equal(detailed["glb"].accessor(skin.attributes.POSITION),
                                  glb.accessor(glb.gltf.meshes[0].primitives[0].attributes.POSITION))
    tangent = detailed["glb"].accessor(skin.attributes.TANGENT)
    normal = detailed["glb"].accessor(skin.attributes.NORMAL)
    np.testing.assert_allclose(np.linalg.norm(tangent[:, :3], axis=1), 1.0, atol=1e-5)
    assert set(np.unique(tangent[:, 3])) <= {-1.0, 1.0}
    skin_vertices = np.unique(tri[0])
    assert np.abs((tangent[skin_vertices, :3] * normal[skin_vertices]).sum(axis=1)).max() < 1e-5
    texcoord = detailed["glb"].accessor(skin.attributes.TEXCOORD_0)
    face_uv = model.uv[model.triangle_uv[on_face].ravel()]
    np.testing.assert_allclose(texcoord[model.triangles[on_face].ravel()],
                               np.stack([face_uv[:, 0], 1.0 - face_uv[:, 1]], axis=1), atol=1e-6)


def test_normal_texture_decoded_as_gltf_says_gives_the_displaced_surface_normals(detailed, model, track):
    """A renderer's normal, n = x T + y B + z N with B = cross(N, T) w (glTF's rule) from the file's
    NORMAL, TANGENT, TEXCOORD_0 and texture, is the displaced surface's normal (engine.detail); read
    with its green channel flipped (the other common convention) or without the texture, it is not."""
    from engine.detail import displaced_normals, texel_geometry
    from engine.uvmap import FaceUV

    g = detailed["glb"]
    attributes = g.gltf.meshes[0].primitives[0].attributes
    face_uv = FaceUV.from_model(model, DETAIL_PX)
    ids, bary = face_uv.texel_corners()

    def at_texels(values):
        return (values[ids] * bary[..., None]).sum(axis=1)

    tangent = g.accessor(attributes.TANGENT).astype(np.float64)
    n = at_texels(g.accessor(attributes.NORMAL).astype(np.float64))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    t = at_texels(tangent[:, :3])
    t -= (t * n).sum(axis=1, keepdims=True) * n
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    b = np.cross(n, t) * tangent[ids[:, 0], 3:]
    st = at_texels(g.accessor(attributes.TEXCOORD_0).astype(np.float64))
    col, row = np.round(st[:, 0] * DETAIL_PX - 0.5).astype(int), np.round(st[:, 1] * DETAIL_PX - 0.5).astype(int)
    rgb = _texture_rgb(g)[row, col] / 255.0 * 2.0 - 1.0

    geometry = texel_geometry(face_uv, model.vertices(take_identity(track, model, key_frames(track))))
    truth = displaced_normals(geometry["normals"], geometry["Pu"], geometry["Pv"],
                              detailed["detail_mm"] / 10.0)[face_uv.mask]

    def error_deg(c):
        rendered = c[:, :1] * t + c[:, 1:2] * b + c[:, 2:] * n
        rendered /= np.linalg.norm(rendered, axis=1, keepdims=True)
        return np.degrees(np.arccos(np.clip((rendered * truth).sum(axis=1), -1.0, 1.0)))

    good = error_deg(rgb)
    assert np.median(good) < 0.6 and np.percentile(good, 95) < 3.0, (np.median(good), np.percentile(good, 95))
    flipped = error_deg(rgb * [1.0, -1.0, 1.0])
    flat = error_deg(np.tile([0.0, 0.0, 1.0], (len(rgb), 1)))
    assert np.median(flipped) > 5 * np.median(good) and np.median(flat) > 5 * np.median(good)


def test_take_detail_is_the_median_of_the_take_maps_or_one_frame(track, tmp_path):
    frames = [int(f) for f in track["frame_index"][key_frames(track)]]
    writer = DetailMapWriter(tmp_path / "detail", tmp_path / "detail_normals", scale_mm=2.0)
    flat = np.zeros((16, 16, 3), np.float32)
    levels = np.linspace(-0.5, 0.7, len(frames))
    for number, level in zip(frames, levels):
        writer.write(number, np.full((16, 16), level, np.float32), flat)
    track = dict(track, detail_scale_mm=np.float64(2.0))
    np.testing.assert_allclose(take_detail_mm(tmp_path, track), np.median(levels), atol=1e-4)
    np.testing.assert_allclose(take_detail_mm(tmp_path, track, frame=frames[1]), levels[1], atol=1e-4)
    with pytest.raises(GltfExportError, match=f"frame {NO_FACE} is not a frame of the take with a face"):
        take_detail_mm(tmp_path, track, frame=NO_FACE)
    with pytest.raises(GltfExportError, match="no detail maps"):
        take_detail_mm(tmp_path, dict(track, detail_scale_mm=np.float64(np.nan)))
    with pytest.raises(GltfExportError, match="no detail maps"):
        take_detail_mm(tmp_path / "elsewhere", track)


def test_a_detail_map_that_is_not_square_is_an_error(model, track, tmp_path):
    with pytest.raises(GltfExportError, match="square"):
        export_gltf(track, model, tmp_path / "x.glb", detail_mm=np.zeros((8, 16), np.float32))
    assert not (tmp_path / "x.glb").exists()
