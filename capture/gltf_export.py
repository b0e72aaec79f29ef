"""A recorded take as one binary glTF 2.0 file (.glb): face mesh, 52 ARKit morph targets, animation.

What the file holds (all lengths in metres, glTF's unit):

- one mesh "Face": the take's identity face at neutral expression, the face
  model's full topology in its own vertex order (POSITION, NORMAL, uint32
  triangle indices). glTF's frame (+y up, +z the asset's front, +x its left,
  right-handed) is the face model's frame, so positions are model
  coordinates / 100 with no axis change.
- 52 morph targets in ARKit order (names in mesh.extras.targetNames, read by
  Blender, three.js and Babylon, and in primitives[0].extras.targetNames, read
  by UniGLTF/UniVRM). Each target is the POSITION delta of the model shape of
  the same name, except browInnerUp and cheekPuff, the *sum* of the model's
  _L and _R deltas: their ARKit weight is the mean of the two halves, so
  weight · (dL + dR) reproduces the model mesh when the halves are equal.
  tongueOut has no model shape and is an all-zero target (an accessor with no
  data, which glTF defines as zeros). Targets carry no NORMAL deltas:
  importers recompute or keep the base normals.
  The deltas are sparse accessors (only the vertices a shape moves, uint16
  indices): a d12 take's file is 10.1 MB with them, 18.0 MB with dense ones.
- one animation "take", LINEAR, keyed at each frame with a face (frames
  without one are left out, so tools interpolate across the gap):
  the Face node's morph weights (the track's 52 ARKit values), and the Head
  node (the Face node's parent) rotation R_head = FRONTAL · R and translation,
  the camera-space head position in the y-up frame relative to the first
  key, so the head starts at the origin.
- a perspective camera "Camera" where the video's camera was (relative to
  the same origin), looking down -z: its view reproduces the video's framing
  (glTF cameras have no principal point offset: it assumes a centred one).

With detail (a take recorded with --detail; `capture export --detail`), the skin detail rides
along as a normal texture: one tangent-space normal map (PNG in the file) of a displacement map
(the texel-wise median of the take's maps, or one frame's) on the face skin, which becomes its own
primitive (material "Skin" with normalTexture; the rest of the head is primitive 1, material
"Head"), with TEXCOORD_0 (the model's UV tile 0, t = 1 - v) and TANGENT (x along u, w so that
the bitangent points along +v, the map's green). glTF has no per-frame textures, so the map is
one for the whole take.

Key times are the track's time_s (seconds, the video's clock). Photo takes
(every time 0) and any other take whose times do not increase strictly are
keyed at frame_index / fps, or one key per second without an fps.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from capture.sinks import decode_displacement
from capture.take_folder import DETAIL_FOLDER
from engine.arkit import ARKIT_NAMES, arkit_mapping_matrix
from engine.detail import tangent_normal_map, texel_geometry
from engine.facemodel import FaceModel
from engine.pose import FRONTAL
from engine.uvmap import FACE_MATERIAL, FaceUV

Progress = Callable[[int, int], None]

GENERATOR = "capture"

# glTF enums
_FLOAT, _UNSIGNED_SHORT, _UNSIGNED_INT = 5126, 5123, 5125
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_TRIANGLES = 4
_N_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
_NUMPY_TYPE = {_FLOAT: np.float32, _UNSIGNED_SHORT: np.uint16, _UNSIGNED_INT: np.uint32}

# GLB container
_GLB_MAGIC, _GLB_VERSION = 0x46546C67, 2
_CHUNK_JSON, _CHUNK_BIN = 0x4E4F534A, 0x004E4942

CM_PER_M = 100.0
#: Key spacing for takes without usable times or fps (photos), seconds.
FALLBACK_KEY_SPACING_S = 1.0
#: The take's detail is the median of at most this many of its maps, evenly spread.
MAX_DETAIL_MAPS = 240
#: Skin-like PBR factors for the detailed export (glTF's default material is a rough metal, which
#: shows a normal texture badly).
_SKIN = {"baseColorFactor": [0.80, 0.62, 0.52, 1.0], "metallicFactor": 0.0, "roughnessFactor": 0.55}


class GltfExportError(ValueError):
    """The track cannot be exported; str() is one line for the user."""


# --------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------


def arkit_morph_targets_m(model: FaceModel) -> np.ndarray:
    """(52, V, 3) float32 POSITION deltas in metres, one per ARKit shape, ARKIT_NAMES order.

    Sums every model shape that feeds an ARKit shape: one shape for most,
    _L + _R for browInnerUp and cheekPuff (whose ARKit weight is their mean),
    none for tongueOut (a zero target).
    """
    feeds = (arkit_mapping_matrix(model.expression_names) > 0).astype(np.float32)  # (52, M)
    V = model.n_vertices
    deltas_cm = feeds @ model.expression_modes.reshape(model.n_expression, V * 3)
    return (deltas_cm / CM_PER_M).astype(np.float32).reshape(len(ARKIT_NAMES), V, 3)


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(V, 3) float32 unit normals, area-weighted over the adjacent triangles.

    A vertex whose triangles have no area gets +z, so every normal is unit
    length as glTF requires.
    """
    v = np.asarray(vertices, dtype=np.float64)
    a, b, c = (v[triangles[:, i]] for i in range(3))
    face = np.cross(b - a, c - a)  # length = 2 · area
    normals = np.zeros_like(v)
    for corner in range(3):
        for axis in range(3):
            normals[:, axis] += np.bincount(triangles[:, corner], weights=face[:, axis], minlength=len(v))
    length = np.linalg.norm(normals, axis=1)
    flat = length < 1e-20
    normals[flat] = (0.0, 0.0, 1.0)
    length[flat] = 1.0
    return (normals / length[:, None]).astype(np.float32)


def vertex_tangents(vertices: np.ndarray, triangles: np.ndarray, vertex_uv: np.ndarray,
                    normals: np.ndarray) -> np.ndarray:
    """(V, 4) float32 glTF tangents: xyz the unit surface direction of increasing u, orthogonal to the
    vertex normal; w = ±1 so that cross(normal, xyz) · w points along increasing v.

    vertices (V, 3), triangles (T, 3) with vertex_uv (V, 2) defined on their corners, normals (V, 3)
    unit. Per triangle, P_u and P_v solve [p1 - p0; p2 - p0] = [uv1 - uv0; uv2 - uv0] [P_u; P_v];
    each vertex sums them weighted by its triangles' areas. Vertices on no triangle get (1, 0, 0, 1).
    """
    v = np.asarray(vertices, np.float64)
    uv = np.asarray(vertex_uv, np.float64)[triangles]                      # (T, 3, 2)
    p = v[triangles]
    dp = np.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]], axis=1)          # (T, 2, 3)
    duv = np.stack([uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]], axis=1)    # (T, 2, 2)
    puv = np.linalg.solve(duv, dp)                                         # (T, 2, 3): rows P_u, P_v
    area = 0.5 * np.linalg.norm(np.cross(dp[:, 0], dp[:, 1]), axis=1)
    acc = np.zeros((2, len(v), 3))
    for corner in range(3):
        for k in range(2):
            for axis in range(3):
                acc[k, :, axis] += np.bincount(triangles[:, corner], weights=area * puv[:, k, axis],
                                               minlength=len(v))
    n = np.asarray(normals, np.float64)
    t = acc[0] - (acc[0] * n).sum(axis=1, keepdims=True) * n
    length = np.linalg.norm(t, axis=1)
    flat = length < 1e-12
    t[flat], length[flat] = (1.0, 0.0, 0.0), 1.0
    w = np.where((np.cross(n, t) * acc[1]).sum(axis=1) < 0, -1.0, 1.0)
    w[flat] = 1.0
    return np.concatenate([t / length[:, None], w[:, None]], axis=1).astype(np.float32)


def take_detail_mm(folder, track: dict, frame: int | None = None) -> np.ndarray:
    """(R, R) float32 mm: the take's displacement map for the export, read from folder/detail/.

    frame: that frame's map (a frame_index of the track); None: the texel-wise median over the
    frames with a face (at most MAX_DETAIL_MAPS of them, evenly spread), the detail the take holds
    throughout. Raises GltfExportError when the take has no detail maps or not the one asked for.
    """
    import cv2

    scale_mm = float(np.asarray(track.get("detail_scale_mm", np.nan)))
    folder = Path(folder) / DETAIL_FOLDER
    if not np.isfinite(scale_mm) or not folder.is_dir():
        raise GltfExportError("the take has no detail maps (record it with --detail)")
    index = np.asarray(track["frame_index"])
    if frame is not None:
        if not np.isin(frame, index[np.asarray(track["face_found"], bool)]):
            raise GltfExportError(f"frame {frame} is not a frame of the take with a face")
        numbers = [int(frame)]
    else:
        numbers = [int(n) for n in index[key_frames(track)]]
    paths = [folder / f"{n:06d}.png" for n in numbers]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise GltfExportError(f"no detail map in {folder} for " +
                              (f"frame {frame}" if frame is not None else "the take's frames with a face"))
    if len(paths) > MAX_DETAIL_MAPS:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, MAX_DETAIL_MAPS).round().astype(int)]
    maps = []
    for path in paths:
        code = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if code is None or code.dtype != np.uint16 or code.ndim != 2 or code.shape[0] != code.shape[1]:
            raise GltfExportError(f"{path} is not a 16-bit square displacement map")
        if maps and code.shape != maps[0].shape:
            raise GltfExportError(f"{path} is {code.shape[0]} px, the take's other maps {maps[0].shape[0]} px")
        maps.append(code)
    return decode_displacement(np.median(np.stack(maps), axis=0), scale_mm)


def normal_texture_png(face_uv: FaceUV, vertices_cm: np.ndarray, detail_mm: np.ndarray) -> bytes:
    """The tangent-space normal map (engine.detail.tangent_normal_map) of detail_mm (R, R) on the
    surface vertices_cm (V, 3), as 8-bit RGB PNG bytes, rgb = (n + 1) / 2."""
    import cv2

    geometry = texel_geometry(face_uv, vertices_cm)
    normals = tangent_normal_map(geometry["Pu"], geometry["Pv"], detail_mm, face_uv.mask)
    rgb = np.clip(np.round((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise GltfExportError("cannot encode the normal texture")
    return data.tobytes()


def quaternions_xyzw(rotations: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations -> (N, 4) unit quaternions (x, y, z, w), glTF's order.

    Sign-continuous (each key on the same side as the one before, so LINEAR
    interpolation takes the short way), the first with w >= 0.
    """
    m = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    m00, m11, m22 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    # 4·w², 4·x², 4·y², 4·z²: take the root of the largest for precision.
    four_sq = np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                        1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=1)
    pick = np.argmax(four_sq, axis=1)
    big = np.sqrt(np.maximum(four_sq[np.arange(len(m)), pick], 1e-300))  # 2·|largest|
    s = m[:, 2, 1] - m[:, 1, 2]  # 4wx
    t = m[:, 0, 2] - m[:, 2, 0]  # 4wy
    u = m[:, 1, 0] - m[:, 0, 1]  # 4wz
    xy, xz, yz = m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1]  # 4xy, 4xz, 4yz
    q = np.empty((len(m), 4))
    cases = {  # largest component -> (x, y, z, w) · 2·largest
        0: (s, t, u, big * big),
        1: (big * big, xy, xz, s),
        2: (xy, big * big, yz, t),
        3: (xz, yz, big * big, u),
    }
    for k, parts in cases.items():
        sel = pick == k
        q[sel] = np.stack([p[sel] for p in parts], axis=1) / (2.0 * big[sel, None])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    if len(q):
        flips = np.sign(np.einsum("ij,ij->i", q[1:], q[:-1]))
        flips[flips == 0] = 1.0
        signs = np.cumprod(np.r_[1.0 if q[0, 3] >= 0 else -1.0, flips])
        q *= signs[:, None]
    return q


def key_frames(track: dict) -> np.ndarray:
    """Indices of the frames that become keys: a face found and every exported value finite."""
    ok = np.asarray(track["face_found"], dtype=bool).copy()
    for name in ("blendshapes", "rotation", "translation"):
        values = np.asarray(track[name], dtype=np.float64)
        ok &= np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    return np.flatnonzero(ok)


def key_times_s(track: dict, frames: np.ndarray) -> np.ndarray:
    """(N,) float32 key times in seconds, strictly increasing, first >= 0.

    The track's time_s when it increases strictly (the video's clock), else
    frame_index / fps, else one key per FALLBACK_KEY_SPACING_S (photos).
    """
    def usable(times: np.ndarray) -> bool:
        t32 = times.astype(np.float32)
        return bool(np.isfinite(times).all() and (times >= 0).all() and (np.diff(t32) > 0).all())

    times = np.asarray(track["time_s"], dtype=np.float64)[frames]
    if usable(times):
        return times.astype(np.float32)
    fps = float(np.asarray(track.get("fps", np.nan)))
    index = np.asarray(track["frame_index"], dtype=np.float64)[frames]
    if np.isfinite(fps) and fps > 0 and usable(index / fps):
        return (index / fps).astype(np.float32)
    return (np.arange(len(frames)) * FALLBACK_KEY_SPACING_S).astype(np.float32)


def take_identity(track: dict, model: FaceModel, frames: np.ndarray) -> np.ndarray:
    """(K,) identity weights of the take: track["identity"], else the last key's per-frame identity."""
    identity = np.asarray(track.get("identity", np.zeros(0)), dtype=np.float32).reshape(-1)
    if not (len(identity) and np.isfinite(identity).all()) and "identity_per_frame" in track:
        identity = np.asarray(track["identity_per_frame"], dtype=np.float32)[frames[-1]]
    if not (len(identity) and np.isfinite(identity).all()):
        raise GltfExportError("the track has no identity for its face")
    if len(identity) > model.n_identity:
        raise GltfExportError(f"the track's identity has {len(identity)} weights, the face model "
                              f"{model.n_identity}: export with the model the take was made with")
    return identity


def camera_perspective(camera_matrix: np.ndarray, image_size) -> dict | None:
    """glTF perspective camera of a pinhole K (pixels) and (width, height); None when unknown."""
    K = np.asarray(camera_matrix, dtype=np.float64)
    w, h = (float(x) for x in np.asarray(image_size).reshape(-1)[:2])
    if not (np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0 and w > 0 and h > 0):
        return None
    yfov = 2.0 * np.arctan(h / (2.0 * K[1, 1]))
    aspect = (w / K[0, 0]) / (h / K[1, 1])  # tan(xfov/2) / tan(yfov/2)
    return {"aspectRatio": float(aspect), "yfov": float(yfov), "znear": 0.01}


# --------------------------------------------------------------------------
# GLB container
# --------------------------------------------------------------------------


class GlbBuilder:
    """Collects binary data into one buffer and the glTF JSON arrays that point into it.

    Every buffer view starts on a 4-byte boundary, so any component type is
    aligned whatever comes before it.
    """

    def __init__(self) -> None:
        self._blob = bytearray()
        self.buffer_views: list[dict] = []
        self.accessors: list[dict] = []

    def view(self, data: np.ndarray, target: int | None = None) -> int:
        """A buffer view over the array's bytes (little-endian); returns its index."""
        self._blob.extend(b"\0" * (-len(self._blob) % 4))
        raw = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        view = {"buffer": 0, "byteOffset": len(self._blob), "byteLength": len(raw)}
        if target is not None:
            view["target"] = target
        self._blob.extend(raw)
        self.buffer_views.append(view)
        return len(self.buffer_views) - 1

    def accessor(self, data: np.ndarray, component: int, kind: str, target: int | None = None,
                 min_max: bool = False) -> int:
        """An accessor over a new view of data (rows of `kind`); min/max from the stored values."""
        data = np.asarray(data, dtype=_NUMPY_TYPE[component])
        rows = data.reshape(-1, _N_COMPONENTS[kind])
        acc = {"bufferView": self.view(rows, target), "componentType": component,
               "count": len(rows), "type": kind}
        if min_max:
            acc.update(_min_max(rows))
        return self._add(acc)

    def sparse_vec3(self, dense: np.ndarray) -> int:
        """A float VEC3 accessor storing only the non-zero rows of dense (V, 3).

        With no non-zero row it has no data at all, which glTF reads as zeros.
        """
        dense = np.asarray(dense, dtype=np.float32)
        acc = {"componentType": _FLOAT, "count": len(dense), "type": "VEC3"}
        acc.update(_min_max(dense))
        rows = np.flatnonzero((dense != 0).any(axis=1))
        if len(rows):
            index_type = _UNSIGNED_SHORT if len(dense) <= 0xFFFF else _UNSIGNED_INT
            acc["sparse"] = {
                "count": len(rows),
                "indices": {"bufferView": self.view(rows.astype(_NUMPY_TYPE[index_type])),
                            "componentType": index_type},
                "values": {"bufferView": self.view(dense[rows])},
            }
        return self._add(acc)

    def _add(self, acc: dict) -> int:
        self.accessors.append(acc)
        return len(self.accessors) - 1

    def glb(self, gltf: dict) -> bytes:
        """The .glb bytes: header, JSON chunk (space-padded), BIN chunk (zero-padded)."""
        blob = bytes(self._blob) + b"\0" * (-len(self._blob) % 4)
        gltf = dict(gltf, buffers=[{"byteLength": len(blob)}],
                    bufferViews=self.buffer_views, accessors=self.accessors)
        text = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 4)
        total = 12 + 8 + len(text) + 8 + len(blob)
        return b"".join([struct.pack("<III", _GLB_MAGIC, _GLB_VERSION, total),
                         struct.pack("<II", len(text), _CHUNK_JSON), text,
                         struct.pack("<II", len(blob), _CHUNK_BIN), blob])


def _detail_parts(b: GlbBuilder, model: FaceModel, base_cm: np.ndarray, base_normals: np.ndarray,
                  attributes: dict, detail_mm: np.ndarray) -> tuple[list[dict], dict]:
    """The face skin (with UVs, tangents and the normal texture) and the rest of the head as two
    primitives over the same vertices, and the glTF arrays their materials need."""
    detail_mm = np.asarray(detail_mm, np.float32)
    if detail_mm.ndim != 2 or detail_mm.shape[0] != detail_mm.shape[1] or not np.isfinite(detail_mm).all():
        raise GltfExportError(f"the detail map must be a finite square (R, R) array, got shape {detail_mm.shape}")
    face_uv = FaceUV.from_model(model, resolution=detail_mm.shape[0])
    on_face = np.asarray(model.material_mask(FACE_MATERIAL), bool)
    vertex_uv = np.nan_to_num(face_uv.vertex_uv, nan=0.0)
    texcoord = np.stack([vertex_uv[:, 0], 1.0 - vertex_uv[:, 1]], axis=1)
    tangents = np.tile(np.float32([1.0, 0.0, 0.0, 1.0]), (model.n_vertices, 1))
    skin = np.unique(face_uv.triangles)
    tangents[skin] = vertex_tangents(base_cm, face_uv.triangles, vertex_uv, base_normals)[skin]
    png = normal_texture_png(face_uv, base_cm, detail_mm)
    skin_attributes = dict(attributes, TEXCOORD_0=b.accessor(texcoord, _FLOAT, "VEC2", _ARRAY_BUFFER),
                           TANGENT=b.accessor(tangents, _FLOAT, "VEC4", _ARRAY_BUFFER))
    parts = [
        {"attributes": skin_attributes, "material": 0,
         "indices": b.accessor(model.triangles[on_face].astype(np.uint32), _UNSIGNED_INT, "SCALAR",
                               _ELEMENT_ARRAY_BUFFER)},
        {"attributes": attributes, "material": 1,
         "indices": b.accessor(model.triangles[~on_face].astype(np.uint32), _UNSIGNED_INT, "SCALAR",
                               _ELEMENT_ARRAY_BUFFER)},
    ]
    textured = {
        "materials": [{"name": "Skin", "pbrMetallicRoughness": dict(_SKIN), "normalTexture": {"index": 0}},
                      {"name": "Head", "pbrMetallicRoughness": dict(_SKIN)}],
        "textures": [{"sampler": 0, "source": 0}],
        "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                      "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}],
        "images": [{"name": "detail_normals", "mimeType": "image/png",
                    "bufferView": b.view(np.frombuffer(png, np.uint8))}],
    }
    return parts, textured


def _min_max(rows: np.ndarray) -> dict:
    """Per-component min and max, as the exact values stored (float32 -> float is exact)."""
    if rows.dtype.kind == "f":
        return {"min": [float(x) for x in rows.min(axis=0)], "max": [float(x) for x in rows.max(axis=0)]}
    return {"min": [int(x) for x in rows.min(axis=0)], "max": [int(x) for x in rows.max(axis=0)]}


# --------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------


def export_gltf(track: dict, model: FaceModel, out_path, progress: Progress | None = None,
                sparse_targets: bool = True, detail_mm: np.ndarray | None = None) -> Path:
    """Writes the take as a .glb at out_path (atomically: temp file, then rename); returns the path.

    track: the arrays of a track.npz (capture.sinks.load_track); model: the
    face model the take was made with. progress(done, total) is called as
    the morph targets are encoded and when the file is written.
    sparse_targets=False writes dense morph deltas (for comparison; larger).
    detail_mm: a displacement map (R, R) mm in the face's UV layout (take_detail_mm) to include as
    the face skin's normal texture; None: no texture, one primitive.
    Raises GltfExportError when the track has no frame with a face or does
    not match the model.
    """
    names = tuple(str(n) for n in track.get("blendshape_names", ARKIT_NAMES))
    if names != ARKIT_NAMES:
        raise GltfExportError("the track's blendshape_names are not the 52 ARKit names in order")
    frames = key_frames(track)
    if len(frames) == 0:
        raise GltfExportError("the take has no frame with a face: nothing to export")
    identity = take_identity(track, model, frames)
    n_targets = len(ARKIT_NAMES)
    total = n_targets + 2
    report = progress or (lambda done, total: None)

    b = GlbBuilder()
    base_cm = model.vertices(identity)
    base_m = (base_cm / CM_PER_M).astype(np.float32)
    base_normals = vertex_normals(base_m, model.triangles)
    position = b.accessor(base_m, _FLOAT, "VEC3", _ARRAY_BUFFER, min_max=True)
    normal = b.accessor(base_normals, _FLOAT, "VEC3", _ARRAY_BUFFER)
    attributes = {"POSITION": position, "NORMAL": normal}
    if detail_mm is None:
        parts = [{"attributes": attributes,
                  "indices": b.accessor(model.triangles.astype(np.uint32), _UNSIGNED_INT, "SCALAR",
                                        _ELEMENT_ARRAY_BUFFER)}]
        textured = {}
    else:
        parts, textured = _detail_parts(b, model, base_cm, base_normals, attributes, detail_mm)
    report(1, total)

    deltas_m = arkit_morph_targets_m(model)
    targets = []
    for k in range(n_targets):
        if sparse_targets:
            acc = b.sparse_vec3(deltas_m[k])
        else:
            acc = b.accessor(deltas_m[k], _FLOAT, "VEC3", _ARRAY_BUFFER, min_max=True)
        targets.append({"POSITION": acc})
        report(2 + k, total)

    # Animation: morph weights on Face, rotation and translation on Head.
    times = key_times_s(track, frames)
    R_head = FRONTAL @ np.asarray(track["rotation"], dtype=np.float64)[frames]
    rotation = quaternions_xyzw(R_head).astype(np.float32)
    position_m = (np.asarray(track["translation"], dtype=np.float64)[frames] @ FRONTAL.T) / CM_PER_M
    origin_m = position_m[0].copy()
    translation = (position_m - origin_m).astype(np.float32)
    weights = np.asarray(track["blendshapes"], dtype=np.float32)[frames]

    time_acc = b.accessor(times, _FLOAT, "SCALAR", min_max=True)
    samplers = [
        {"input": time_acc, "output": b.accessor(weights, _FLOAT, "SCALAR"), "interpolation": "LINEAR"},
        {"input": time_acc, "output": b.accessor(rotation, _FLOAT, "VEC4"), "interpolation": "LINEAR"},
        {"input": time_acc, "output": b.accessor(translation, _FLOAT, "VEC3"), "interpolation": "LINEAR"},
    ]
    HEAD, FACE, CAMERA = 0, 1, 2
    channels = [
        {"sampler": 0, "target": {"node": FACE, "path": "weights"}},
        {"sampler": 1, "target": {"node": HEAD, "path": "rotation"}},
        {"sampler": 2, "target": {"node": HEAD, "path": "translation"}},
    ]

    target_names = list(ARKIT_NAMES)
    nodes = [
        {"name": "Head", "children": [FACE], "rotation": [float(x) for x in rotation[0]],
         "translation": [0.0, 0.0, 0.0]},
        {"name": "Face", "mesh": 0},
    ]
    gltf = {
        "asset": {"version": "2.0", "generator": GENERATOR},
        "scene": 0,
        "scenes": [{"name": "take", "nodes": [HEAD]}],
        "nodes": nodes,
        "meshes": [{
            "name": "Face",
            "primitives": [dict(part, mode=_TRIANGLES, targets=targets, extras={"targetNames": target_names})
                           for part in parts],
            "weights": [0.0] * n_targets,
            "extras": {"targetNames": target_names},
        }],
        "animations": [{"name": "take", "samplers": samplers, "channels": channels}],
        **textured,
    }
    camera = camera_perspective(track.get("camera_matrix", np.full((3, 3), np.nan)),
                                track.get("image_size", (0, 0)))
    if camera is not None:
        gltf["cameras"] = [{"name": "Camera", "type": "perspective", "perspective": camera}]
        nodes.append({"name": "Camera", "camera": 0, "translation": [float(x) for x in -origin_m]})
        gltf["scenes"][0]["nodes"].append(CAMERA)

    out_path = Path(out_path)
    data = b.glb(gltf)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out_path)
    except BaseException:  # a full disk, a folder in the way, Ctrl-C: no half file left behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    report(total, total)
    return out_path
