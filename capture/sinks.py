"""Writers for capture results: Live Link Face CSV, per-frame meshes, track.npz.

Every writer keeps what it already wrote valid if the process dies midway:
the CSV is flushed after each row, each mesh file and each track checkpoint
is written under a temporary name in the same folder and then renamed with
``os.replace`` (atomic on POSIX), so a final name never holds half a file.
No fsync is done (too slow per frame): this guards against a crashed
process, not against losing power.
"""
from __future__ import annotations

import csv
import io
import math
import os
import queue
import threading
import time

import numba
import numpy as np

from engine.arkit import (ARKIT_NAMES, LIVELINK_CSV_NAMES, LIVELINK_POSE_NAMES, LIVELINK_POSE_SIGNS, livelink_pose,
                          pascal_case, swap_mouth_left_right)

# --------------------------------------------------------------------------
# Live Link Face CSV
# --------------------------------------------------------------------------


def livelink_timecode(time_s: float, fps: float) -> str:
    """``HH:MM:SS:FF.fff`` as Live Link Face writes it.

    FF is the whole frame within the second at ``fps`` and .fff the
    sub-frame fraction (thousandths of a frame). Rounded to the nearest
    thousandth of a frame first, carrying into the next second, so float
    noise (0.1 s * 30 = 3.0000000000000004) never yields ``02.999`` or ``30``.
    Hours are not wrapped at 24.
    """
    if not (time_s >= 0.0 and math.isfinite(time_s)):
        raise ValueError(f"time_s must be finite and >= 0, got {time_s!r}")
    whole_s = math.floor(time_s)
    millframes = round((time_s - whole_s) * fps * 1000.0)
    if millframes >= round(fps * 1000.0):
        whole_s += 1
        millframes = 0
    frame, thousandths = divmod(millframes, 1000)
    hours, rest = divmod(whole_s, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}:{frame:02d}.{thousandths:03d}"


def _csv_order_from_arkit() -> np.ndarray:
    """Index array so ``arkit_values[order]`` is in LIVELINK_CSV_NAMES order.

    Matched by name (pascal_case of the Apple name), never by position,
    because the two orders differ at Jaw/Mouth Left/Right.
    """
    index = {pascal_case(n): i for i, n in enumerate(ARKIT_NAMES)}
    missing = [n for n in LIVELINK_CSV_NAMES if n not in index]
    if missing or len(index) != len(LIVELINK_CSV_NAMES):
        raise ValueError(f"ARKit and Live Link names do not match: {missing}")
    return np.array([index[n] for n in LIVELINK_CSV_NAMES], dtype=np.intp)


class LiveLinkCsvWriter:
    """Writes a Live Link Face CSV, one flushed row per frame.

    Values are written with 6 decimals; NaN (e.g. a frame without a face,
    if the caller passes NaN) is written as ``nan``. Head and eye angles are
    given in engine/pose.py's convention and written with the app's signs
    (yaw and roll negated: yaw > 0 toward the subject's right, as in real
    Live Link Face takes; engine.arkit.livelink_pose). swap_mouth_lr writes
    mouthLeft under MouthRight and back, to match app versions that swap them.
    """

    HEADER = ("Timecode", "BlendShapeCount", *LIVELINK_CSV_NAMES, *LIVELINK_POSE_NAMES)

    def __init__(self, path, fps: float, swap_mouth_lr: bool = False):
        if not (fps > 0.0 and math.isfinite(fps)):
            raise ValueError(f"fps must be finite and > 0, got {fps!r}")
        self.path = os.fspath(path)
        self.fps = float(fps)
        self.swap_mouth_lr = swap_mouth_lr
        self._order = _csv_order_from_arkit()
        self._file = open(self.path, "w", encoding="ascii", newline="")
        self._file.write(",".join(self.HEADER) + "\n")
        self._file.flush()

    def write(self, time_s: float, blendshapes, head_ypr_rad, left_eye_ypr_rad,
              right_eye_ypr_rad) -> None:
        """One row: blendshapes (52,) in ARKIT_NAMES order, poses (3,) yaw pitch roll radians."""
        if self._file is None:
            raise ValueError("writer is closed")
        shapes = np.asarray(blendshapes, dtype=np.float64).reshape(-1)
        if shapes.shape != (len(ARKIT_NAMES),):
            raise ValueError(f"blendshapes must be ({len(ARKIT_NAMES)},), got {shapes.shape}")
        if self.swap_mouth_lr:
            shapes = swap_mouth_left_right(shapes)
        pose = livelink_pose(head_ypr_rad, left_eye_ypr_rad, right_eye_ypr_rad)
        values = np.concatenate([shapes[self._order], pose]).tolist()
        row = [livelink_timecode(float(time_s), self.fps), str(len(values))]
        row.extend("%.6f" % v for v in values)
        # One write call per row, then flush: a crash keeps every full row.
        self._file.write(",".join(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_livelink_csv(path):
    """(timecodes list[str], blendshapes (F,52) float32 in ARKIT_NAMES order, pose (F,9) float32).

    Columns are found by header name, so any column order works. A short
    last row (a line cut by a crash) is skipped; a short row elsewhere is an
    error. Pose columns are in LIVELINK_POSE_NAMES order, radians, turned back
    into engine/pose.py's convention (the file's yaw and roll negated), so a
    real Live Link Face take and ours read the same way. Shapes are read by
    name as written (no mouth swap).
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty file, no header")
    header = [h.strip() for h in rows[0]]
    col = {name: i for i, name in enumerate(header)}
    wanted = ["Timecode", *(pascal_case(n) for n in ARKIT_NAMES), *LIVELINK_POSE_NAMES]
    missing = [n for n in wanted if n not in col]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    body = [r for r in rows[1:] if r]
    if body and len(body[-1]) < len(header):
        body = body[:-1]
    for k, r in enumerate(body):
        if len(r) < len(header):
            raise ValueError(f"{path}: row {k + 1} has {len(r)} of {len(header)} columns")
    timecodes = [r[col["Timecode"]] for r in body]
    shape_cols = [col[pascal_case(n)] for n in ARKIT_NAMES]
    pose_cols = [col[n] for n in LIVELINK_POSE_NAMES]
    blendshapes = np.array([[float(r[c]) for c in shape_cols] for r in body],
                           dtype=np.float32).reshape(len(body), len(ARKIT_NAMES))
    pose = (np.array([[float(r[c]) for c in pose_cols] for r in body]).reshape(len(body), len(LIVELINK_POSE_NAMES))
            * LIVELINK_POSE_SIGNS).astype(np.float32)
    return timecodes, blendshapes, pose


# --------------------------------------------------------------------------
# Per-frame meshes
# --------------------------------------------------------------------------

#: Largest |coordinate| in cm the OBJ formatter accepts (keeps the 4-decimal
#: fixed-point integer well inside float64's exact range and the buffer bound).
OBJ_MAX_ABS_CM = 1e10
#: Bytes per vertex line at most: "v " + 3 * (sign, 11 int digits, ".", 4) + 3 separators.
_OBJ_VERTEX_LINE_MAX = 2 + 3 * (1 + 11 + 1 + 4) + 3


@numba.njit(cache=True, nogil=True)
def _format_obj_vertices(vertices_cm, out):
    """Writes ``v x y z\\n`` lines with 4 decimals into ``out``; returns bytes used.

    Returns -1 if a coordinate is NaN, infinite or beyond OBJ_MAX_ABS_CM.
    float32 * 10000 is exact in float64 (24 + 14 bits), so rounding that
    product half-to-even (rint) gives the correctly rounded decimal, the
    same digits as Python's ``"%.4f" % value``, except that a value that
    rounds to zero is written without a sign. Unsigned digit arithmetic and
    short paths for 1-2 integer digits keep it at ~7 ns per coordinate.
    """
    ten = np.uint64(10)
    p = 0
    for i in range(vertices_cm.shape[0]):
        out[p] = 118  # 'v'
        out[p + 1] = 32
        p += 2
        for j in range(3):
            x = np.float64(vertices_cm[i, j]) * 10000.0
            if not (abs(x) <= OBJ_MAX_ABS_CM * 10000.0):
                return -1
            n = np.int64(np.rint(x))
            if n < 0:
                out[p] = 45  # '-'
                p += 1
                n = -n
            u = np.uint64(n)
            whole = u // np.uint64(10000)
            frac = u - whole * np.uint64(10000)
            if whole < ten:
                out[p] = 48 + whole
                p += 1
            elif whole < np.uint64(100):
                t = whole // ten
                out[p] = 48 + t
                out[p + 1] = 48 + (whole - t * ten)
                p += 2
            else:
                k = 0
                w = whole
                while w > 0:
                    w //= ten
                    k += 1
                q = p + k
                w = whole
                while w > 0:
                    q -= 1
                    t = w // ten
                    out[q] = 48 + (w - t * ten)
                    w = t
                p += k
            hi = frac // np.uint64(100)
            lo = frac - hi * np.uint64(100)
            hi1 = hi // ten
            lo1 = lo // ten
            out[p] = 46  # '.'
            out[p + 1] = 48 + hi1
            out[p + 2] = 48 + (hi - hi1 * ten)
            out[p + 3] = 48 + lo1
            out[p + 4] = 48 + (lo - lo1 * ten)
            out[p + 5] = 10 if j == 2 else 32
            p += 6
    return p


def _obj_face_bytes(triangles: np.ndarray) -> bytes:
    """The constant ``f a b c`` section (1-based), built once per writer."""
    one_based = (triangles.astype(np.int64) + 1).tolist()
    return "".join("f %d %d %d\n" % (a, b, c) for a, b, c in one_based).encode("ascii")


def _ply_face_bytes(triangles: np.ndarray) -> bytes:
    """The constant binary face element: uchar 3 then three little-endian int32."""
    rec = np.empty(len(triangles), dtype=np.dtype([("n", "u1"), ("i", "<i4", (3,))]))
    rec["n"] = 3
    rec["i"] = triangles
    return rec.tobytes()


def _write_atomic(path: str, chunks) -> None:
    """Writes the byte chunks to a temp name beside ``path``, then renames it over."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, "." + name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            views = [memoryview(c).cast("B") for c in chunks]
            while views:  # one writev syscall, looped in case it writes part
                done = os.writev(fd, views)
                while views and done >= views[0].nbytes:
                    done -= views[0].nbytes
                    views.pop(0)
                if views:
                    views[0] = views[0][done:]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def encode_displacement(displacement_mm: np.ndarray, scale_mm: float) -> np.ndarray:
    """(R, R) mm -> uint16: 32768 + round(32767 · d / scale_mm), clipped (decode_displacement inverts it)."""
    code = 32768.0 + np.round(np.asarray(displacement_mm, np.float64) / scale_mm * 32767.0)
    return np.clip(code, 0, 65535).astype(np.uint16)


def decode_displacement(code: np.ndarray, scale_mm: float) -> np.ndarray:
    """uint16 map (encode_displacement) -> (R, R) float32 mm."""
    return ((np.asarray(code, np.float64) - 32768.0) / 32767.0 * scale_mm).astype(np.float32)


class DetailMapWriter:
    """--detail's per-frame maps: ``detail/NNNNNN.png`` (16-bit grey displacement, mm = (v - 32768) / 32767 ·
    scale_mm, the scale in track.npz as detail_scale_mm) and ``detail_normals/NNNNNN.png`` (8-bit RGB
    tangent-space normal map, rgb = (n + 1) / 2, x along u, y along v, z out of the skin), each written
    atomically, in the face model's UV layout (tile 0, row 0 at v = 1)."""

    def __init__(self, displacement_dir, normal_dir, scale_mm: float):
        self.displacement_dir, self.normal_dir = os.fspath(displacement_dir), os.fspath(normal_dir)
        self.scale_mm = float(scale_mm)
        os.makedirs(self.displacement_dir, exist_ok=True)
        os.makedirs(self.normal_dir, exist_ok=True)

    def paths_of(self, number: int) -> tuple[str, str]:
        name = f"{number:06d}.png"
        return os.path.join(self.displacement_dir, name), os.path.join(self.normal_dir, name)

    def keep_only(self, numbers) -> None:
        """Removes the maps of frames not in numbers (a take cut back after a failed write)."""
        keep = {f"{int(n):06d}.png" for n in numbers}
        for folder in (self.displacement_dir, self.normal_dir):
            for name in os.listdir(folder):
                if name not in keep:
                    try:
                        os.remove(os.path.join(folder, name))
                    except OSError:
                        pass

    def write(self, number: int, displacement_mm: np.ndarray, normals: np.ndarray) -> None:
        import cv2

        rgb = np.clip(np.round((np.asarray(normals) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        d_path, n_path = self.paths_of(number)
        for path, image in ((d_path, encode_displacement(displacement_mm, self.scale_mm)),
                            (n_path, rgb[..., ::-1])):     # OpenCV writes BGR
            ok, data = cv2.imencode(".png", np.ascontiguousarray(image))
            if not ok:
                raise OSError(f"cannot encode {path}")
            _write_atomic(path, [data])


class MeshSequenceWriter:
    """One mesh file per frame, ``directory/NNNNNN.obj`` or ``.ply``, vertices in cm.

    The face section never changes, so it is built once here; each write
    only formats the vertices (numba kernel for OBJ, raw float32 for PLY).
    OBJ vertices are written with 4 decimals (0.0001 cm); PLY keeps float32.
    """

    def __init__(self, directory, triangles, fmt: str = "obj"):
        if fmt not in ("obj", "ply"):
            raise ValueError(f"fmt must be 'obj' or 'ply', got {fmt!r}")
        tri = np.asarray(triangles)
        if tri.ndim != 2 or tri.shape[1] != 3 or not np.issubdtype(tri.dtype, np.integer):
            raise ValueError(f"triangles must be (T, 3) integers, got {tri.shape} {tri.dtype}")
        if tri.size and (tri.min() < 0 or tri.max() > np.iinfo(np.int32).max):
            raise ValueError("triangle indices must be in [0, 2**31)")
        self.directory = os.fspath(directory)
        self.fmt = fmt
        self.n_triangles = len(tri)
        self._min_vertices = int(tri.max()) + 1 if tri.size else 0
        os.makedirs(self.directory, exist_ok=True)
        self._faces = _obj_face_bytes(tri) if fmt == "obj" else _ply_face_bytes(tri)
        self._text = np.empty(0, dtype=np.uint8)  # OBJ vertex text, grown on demand

    def path_of(self, number: int) -> str:
        return os.path.join(self.directory, f"{number:06d}.{self.fmt}")

    def write(self, number: int, vertices) -> str:
        """Writes frame ``number``'s mesh from vertices (V, 3) cm; returns the path."""
        number = int(number)
        if number < 0:
            raise ValueError(f"frame number must be >= 0, got {number}")
        v = np.ascontiguousarray(vertices, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != 3:
            raise ValueError(f"vertices must be (V, 3), got {v.shape}")
        if len(v) < self._min_vertices:
            raise ValueError(f"{len(v)} vertices but triangles index up to {self._min_vertices - 1}")
        path = self.path_of(number)
        if self.fmt == "obj":
            need = len(v) * _OBJ_VERTEX_LINE_MAX
            if self._text.size < need:
                self._text = np.empty(need, dtype=np.uint8)
            used = _format_obj_vertices(v, self._text)
            if used < 0:
                raise ValueError(f"vertices must be finite with |x| <= {OBJ_MAX_ABS_CM} cm")
            _write_atomic(path, (self._text[:used], self._faces))
        else:
            header = (
                "ply\nformat binary_little_endian 1.0\ncomment units cm\n"
                f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
                f"element face {self.n_triangles}\nproperty list uchar int vertex_indices\n"
                "end_header\n"
            ).encode("ascii")
            _write_atomic(path, (header, v.astype("<f4", copy=False), self._faces))
        return path


class BackgroundMeshWriter:
    """A MeshSequenceWriter on its own thread: formatting and file I/O (which release
    the GIL) overlap with the next frame's tracking on a second core.

    The queue is bounded and `write` blocks when it is full, so no mesh is ever
    dropped; an error on the thread is raised by the next `write` or by `close`.
    """

    def __init__(self, writer: "MeshSequenceWriter", queue_size: int = 4):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mesh-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # handed to the producer thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def write(self, number: int, vertices) -> None:
        self._raise()
        self._queue.put((number, np.array(vertices, dtype=np.float32)))

    def close(self) -> None:
        """Writes everything queued, then stops the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


def read_obj(path):
    """(vertices (V,3) float32, triangles (T,3) int64 0-based) from ``v`` and ``f`` lines.

    Minimal: reads ``f a/b/c`` forms and negative (relative) indices,
    triangles only; for tests and evaluation.
    """
    verts, faces = [], []
    with open(path, encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "v":
                verts.append([float(x) for x in parts[1:4]])
            elif parts[0] == "f":
                if len(parts) != 4:
                    raise ValueError(f"{path}: only triangles are read, got {line!r}")
                idx = [int(p.split("/")[0]) for p in parts[1:]]
                faces.append([i - 1 if i > 0 else len(verts) + i for i in idx])
    return (np.array(verts, dtype=np.float32).reshape(-1, 3),
            np.array(faces, dtype=np.int64).reshape(-1, 3))


def read_ply(path):
    """(vertices (V,3) float32, triangles (T,3) int64) from a PLY as MeshSequenceWriter writes it.

    Minimal: binary_little_endian, float x y z, ``list uchar int`` triangles.
    """
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    header = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ValueError(f"{path}: only binary_little_endian PLY is read")
    counts = {}
    for line in header:
        parts = line.split()
        if parts[:1] == ["element"]:
            counts[parts[1]] = int(parts[2])
    n_v, n_f = counts.get("vertex", 0), counts.get("face", 0)
    body = end + len(b"end_header\n")
    vertices = np.frombuffer(data, dtype="<f4", count=n_v * 3, offset=body).reshape(n_v, 3)
    rec = np.frombuffer(data, dtype=np.dtype([("n", "u1"), ("i", "<i4", (3,))]),
                        count=n_f, offset=body + n_v * 12)
    if n_f and not np.all(rec["n"] == 3):
        raise ValueError(f"{path}: only triangles are read")
    return vertices.astype(np.float32), rec["i"].astype(np.int64)


# --------------------------------------------------------------------------
# track.npz
# --------------------------------------------------------------------------


class TrackWriter:
    """Accumulates per-frame fit results and saves them as one ``.npz``.

    Frames without a face keep NaN in every float array (never invented
    values); values passed along with ``face_found=False`` are ignored, and
    any per-frame argument left as None is NaN too. The file holds one
    camera: ``camera_matrix`` (3,3) and ``image_size`` (width, height) in
    input pixels, meant to be the first image's when image sizes vary
    (update with ``set_camera``; landmarks68 stay in each frame's own input
    pixels). Until known, camera_matrix is NaN and image_size (0, 0); until
    ``set_identity``, identity is empty (0,).

    ``decoded`` is False on a frame the source could not decode (a corrupt
    video's skipped frame: no face, NaN everywhere, time and index kept);
    ``confidence`` is the tracker's on a frame with a face (1: FaceMesh's own
    landmarks; at most 0.5: followed through a profile), NaN without one.
    ``depth_residual_mm`` is an RGB-D frame's median |model − depth| after the fit
    (engine.depth_fit, point to plane over the face samples the depth sees), NaN on
    frames without depth or a face.

    ``add`` re-saves at most every ``checkpoint_every_s`` of wall time (the
    first ``add`` saves at once), so a crash loses little; each save
    rewrites the whole file atomically. Saves grow with the take (~110 ms
    for 18000 frames), so the interval also stretches to
    ``CHECKPOINT_COST_RATIO`` times the last save's duration, keeping
    checkpoints under ~5% of wall time on long takes.
    """

    #: Wall time between checkpoints, as a multiple of the last save's duration.
    CHECKPOINT_COST_RATIO = 20.0

    def __init__(self, path, camera_matrix=None, image_size=None, n_expression: int = 53,
                 checkpoint_every_s: float = 2.0, n_identity: int = 60, fps: float = float("nan")):
        self.path = os.fspath(path)
        self.fps = float(fps)
        self.n_expression = int(n_expression)
        self.n_identity = int(n_identity)
        self.checkpoint_every_s = float(checkpoint_every_s)
        self.camera_matrix = np.full((3, 3), np.nan)
        self.image_size = np.zeros(2, dtype=np.int64)
        self.set_camera(camera_matrix, image_size)
        self.identity = np.zeros(0, dtype=np.float32)
        self.detail_scale_mm = float("nan")  # --detail: the displacement maps' full scale (DetailMapWriter)
        self._count = 0
        self.saved_frames = 0  # frames in the file on disk (0: none written yet)
        self._last_save_s = -math.inf
        self._last_save_duration_s = 0.0
        self._closed = False
        n_bs = len(ARKIT_NAMES)
        # Per-frame buffers grown by doubling, so saves need no stacking.
        self._spec = {
            "frame_index": ((), np.int64, 0),
            "time_s": ((), np.float64, np.nan),
            "face_found": ((), np.bool_, False),
            "decoded": ((), np.bool_, True),
            "confidence": ((), np.float32, np.nan),
            "depth_residual_mm": ((), np.float32, np.nan),
            "blendshapes": ((n_bs,), np.float32, np.nan),
            "expression": ((self.n_expression,), np.float32, np.nan),
            "rotation": ((3, 3), np.float32, np.nan),
            "translation": ((3,), np.float32, np.nan),
            "landmarks68": ((68, 2), np.float32, np.nan),
            "eyes_ypr_rad": ((2, 3), np.float32, np.nan),
            "identity_per_frame": ((self.n_identity,), np.float32, np.nan),
        }
        self._buf = {k: np.full((0, *s), fill, dtype=dt) for k, (s, dt, fill) in self._spec.items()}

    def set_camera(self, camera_matrix=None, image_size=None) -> None:
        """Sets the stored camera (3,3) input pixels and/or image size (width, height)."""
        if camera_matrix is not None:
            k = np.asarray(camera_matrix, dtype=np.float64)
            if k.shape != (3, 3):
                raise ValueError(f"camera_matrix must be (3, 3), got {k.shape}")
            self.camera_matrix = k.copy()
        if image_size is not None:
            wh = np.asarray(image_size, dtype=np.int64).reshape(-1)
            if wh.shape != (2,):
                raise ValueError(f"image_size must be (width, height), got {wh.shape}")
            self.image_size = wh.copy()

    def set_identity(self, identity) -> None:
        """Sets the (K,) identity weights; one per track."""
        self.identity = np.asarray(identity, dtype=np.float32).reshape(-1).copy()

    def _grow(self) -> None:
        cap = max(64, 2 * len(self._buf["frame_index"]))
        for k, (shape, dt, fill) in self._spec.items():
            new = np.full((cap, *shape), fill, dtype=dt)
            new[: self._count] = self._buf[k][: self._count]
            self._buf[k] = new

    def add(self, frame_index: int, time_s: float, face_found: bool, blendshapes=None,
            expression=None, rotation=None, translation=None, landmarks68=None,
            identity=None, eyes_ypr_rad=None, confidence=None, decoded: bool = True,
            depth_residual_mm=None) -> None:
        """Appends one frame; saves a checkpoint if ``checkpoint_every_s`` has passed.

        identity (n_identity,) is the identity this frame was fitted with: it changes while
        a take's identity converges, and from photo to photo in ``capture image``.
        """
        if self._closed:
            raise ValueError("writer is closed")
        values = {"blendshapes": blendshapes, "expression": expression, "rotation": rotation,
                  "translation": translation, "landmarks68": landmarks68, "identity_per_frame": identity,
                  "eyes_ypr_rad": eyes_ypr_rad, "confidence": confidence, "depth_residual_mm": depth_residual_mm}
        checked = {}
        for name, value in values.items():
            if value is None or not face_found:
                continue
            shape, dt, _ = self._spec[name]
            arr = np.asarray(value, dtype=dt)
            if arr.shape != shape:
                raise ValueError(f"{name} must be {shape}, got {arr.shape}")
            checked[name] = arr
        if self._count == len(self._buf["frame_index"]):
            self._grow()
        i = self._count
        self._buf["frame_index"][i] = int(frame_index)
        self._buf["time_s"][i] = float(time_s)
        self._buf["face_found"][i] = bool(face_found)
        self._buf["decoded"][i] = bool(decoded)
        for name in values:
            self._buf[name][i] = checked.get(name, np.nan)
        self._count += 1
        interval_s = max(self.checkpoint_every_s,
                         self.CHECKPOINT_COST_RATIO * self._last_save_duration_s)
        if time.monotonic() - self._last_save_s >= interval_s:
            self.save()

    @property
    def frames(self) -> int:
        """Frames added so far."""
        return self._count

    def arrays(self, frames: int | None = None) -> dict[str, np.ndarray]:
        """The arrays as saved (views of the buffers for per-frame ones), of the first
        `frames` frames (default: all)."""
        count = self._count if frames is None else min(int(frames), self._count)
        out = {k: b[:count] for k, b in self._buf.items()}
        out["blendshape_names"] = np.array(ARKIT_NAMES)
        out["identity"] = self.identity
        out["camera_matrix"] = self.camera_matrix
        out["image_size"] = self.image_size
        out["fps"] = np.float64(self.fps)
        out["detail_scale_mm"] = np.float64(self.detail_scale_mm)
        return out

    def save(self, frames: int | None = None) -> None:
        """Writes the file atomically (temp file beside it, then os.replace), with the first
        `frames` frames (default: all); `saved_frames` says how many the file holds."""
        start_s = time.monotonic()
        buffer = io.BytesIO()
        arrays = self.arrays(frames)
        np.savez(buffer, **arrays)
        _write_atomic(self.path, [buffer.getbuffer()])
        self.saved_frames = len(arrays["frame_index"])
        self._last_save_s = time.monotonic()
        self._last_save_duration_s = self._last_save_s - start_s

    def close(self, save: bool = True) -> None:
        """Saves and stops accepting frames; calling it twice is harmless. save=False leaves
        the file as last saved (a caller that saved a part of the take itself)."""
        if not self._closed:
            if save:
                self.save()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_track(path) -> dict[str, np.ndarray]:
    """The arrays of a track.npz, loaded eagerly: only a take's own arrays, no pickles,
    sizes checked before anything is inflated (capture.takes.read_track; TakeError)."""
    from capture.takes import read_track

    return read_track(path)
