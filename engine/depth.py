"""Depth images for RGB-D capture: calibration, registration to the colour camera, clean-up,
back-projection, normals and point-cloud export.

Plain functions over numpy arrays; nothing is cached between calls. Units are in the names:
depth in mm (what sensors deliver), points in cm (the face model's and the fit's unit), pixels
in px. Cameras follow engine.pose: x right, y down, z forward, u = fx·x/z + cx, pixel centres at
integer coordinates.

Open3D is optional and not used here (README, "RGB-D takes", has the numbers for one 640x480
frame): its way to register (a point cloud from the depth, moved, projected to a depth image)
gives the same pixels but takes 4-6 times as long as register_depth (bench/bench_registration.py);
its organised back-projection is a little slower than backproject; its normal map is about twice
as fast as organized_normals but one-sided (forward differences, half a pixel off), and normals are
off the per-frame path (the fit takes its own at its samples).
None of that is worth a 400 MB dependency.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numba
import numpy as np

# The BIWI Kinect head pose database's colour camera and depth-to-colour transform, as its
# calibration gives them (quoted in ../shared/data/rgbd/biwi01/README.md). A folder in BIWI's
# layout carries only depth_intrinsics.txt, so these are the defaults for the rest.
BIWI_COLOUR_K_PX = ((517.679, 0.0, 320.0), (0.0, 517.679, 240.5), (0.0, 0.0, 1.0))
BIWI_R_DEPTH_TO_COLOUR = ((0.999947, 0.00432361, 0.00929419),
                          (-0.00446314, 0.999877, 0.0150443),
                          (-0.009228, -0.015085, 0.999844))
BIWI_T_DEPTH_TO_COLOUR_MM = (-24.0198, 5.8896, -13.2308)

_CALIBRATION_FORMAT = "capture-rgbd-calibration"
_ROTATION_TOLERANCE = 1e-3  # |RᵀR − I| and |det R − 1|: BIWI's published R is good to ~1e-5


def _matrix(value, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A read-only float64 copy of value with the given shape, finite, or ValueError naming it."""
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not numeric") from None
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} is not finite")
    array.setflags(write=False)
    return array


def _check_K(K: np.ndarray, name: str) -> None:
    if not (K[0, 0] > 0 and K[1, 1] > 0 and K[0, 1] == 0 and K[1, 0] == 0
            and np.array_equal(K[2], [0.0, 0.0, 1.0])):
        raise ValueError(f"{name} is not a pinhole camera matrix [[fx,0,cx],[0,fy,cy],[0,0,1]] with fx, fy > 0")


@dataclass(frozen=True, eq=False)
class DepthCalibration:
    """How a depth camera's pixels map into the colour camera: X_colour = R · X_depth + t (mm).

    Raw depth value × depth_unit_mm = the depth camera's z in mm. The arrays are read-only
    float64 copies; a K, R or t that is not one (wrong shape, not finite, R not a rotation)
    raises ValueError on construction.
    """

    colour_K: np.ndarray  # (3, 3) px
    depth_K: np.ndarray  # (3, 3) px
    R_depth_to_colour: np.ndarray  # (3, 3)
    t_depth_to_colour_mm: np.ndarray  # (3,) mm
    depth_unit_mm: float = 1.0

    def __post_init__(self) -> None:
        for name, shape in (("colour_K", (3, 3)), ("depth_K", (3, 3)),
                            ("R_depth_to_colour", (3, 3)), ("t_depth_to_colour_mm", (3,))):
            object.__setattr__(self, name, _matrix(getattr(self, name), shape, name))
        _check_K(self.colour_K, "colour_K")
        _check_K(self.depth_K, "depth_K")
        R = self.R_depth_to_colour
        if (np.abs(R.T @ R - np.eye(3)).max() > _ROTATION_TOLERANCE
                or abs(np.linalg.det(R) - 1.0) > _ROTATION_TOLERANCE):
            raise ValueError("R_depth_to_colour is not a rotation")
        unit = self.depth_unit_mm
        if isinstance(unit, bool) or not isinstance(unit, (int, float)) or not (0 < unit < float("inf")):
            raise ValueError(f"depth_unit_mm must be a finite number > 0, got {unit!r}")
        object.__setattr__(self, "depth_unit_mm", float(unit))

    @classmethod
    def registered(cls, colour_K, depth_unit_mm: float = 1.0) -> "DepthCalibration":
        """Depth already in the colour camera (same K, identity extrinsics), as our takes store it."""
        return cls(colour_K, colour_K, np.eye(3), np.zeros(3), depth_unit_mm)

    @property
    def is_registered(self) -> bool:
        """True when depth pixels are colour pixels already (register_depth would move nothing)."""
        return (np.array_equal(self.colour_K, self.depth_K)
                and np.array_equal(self.R_depth_to_colour, np.eye(3))
                and not self.t_depth_to_colour_mm.any())

    def to_dict(self) -> dict:
        """JSON-ready fields (lists of floats), with a format tag and version."""
        return {
            "format": _CALIBRATION_FORMAT, "version": 1,
            "colour_K": self.colour_K.tolist(), "depth_K": self.depth_K.tolist(),
            "R_depth_to_colour": self.R_depth_to_colour.tolist(),
            "t_depth_to_colour_mm": self.t_depth_to_colour_mm.tolist(),
            "depth_unit_mm": self.depth_unit_mm,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DepthCalibration":
        """The inverse of to_dict; other keys (a take's fps) are ignored. ValueError when wrong."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in ("colour_K", "depth_K", "R_depth_to_colour", "t_depth_to_colour_mm")
                   if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return cls(data["colour_K"], data["depth_K"], data["R_depth_to_colour"],
                   data["t_depth_to_colour_mm"], data.get("depth_unit_mm", 1.0))

    def to_json(self, path: str | os.PathLike, **extra) -> None:
        """Writes to_dict() plus extra keys (e.g. fps=30.0) as JSON, atomically (temp name, rename)."""
        data = {**self.to_dict(), **extra}
        path = Path(path)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DepthCalibration":
        """Reads to_json's file. ValueError 'PATH: problem' (one line) when it cannot."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{path}: {reason}") from None

    @classmethod
    def biwi(cls, folder: str | os.PathLike) -> "DepthCalibration":
        """A folder in the BIWI layout: depth_intrinsics.txt (fx fy cx cy, px) for the depth
        camera, the BIWI Kinect's colour K and extrinsics (the constants above) for the rest."""
        path = Path(folder) / "depth_intrinsics.txt"
        try:
            values = [float(v) for v in path.read_text(encoding="ascii").split()]
        except (OSError, UnicodeDecodeError, ValueError):
            raise ValueError(f"{path}: not four numbers fx fy cx cy") from None
        if len(values) != 4:
            raise ValueError(f"{path}: {len(values)} numbers, expected four (fx fy cx cy)")
        fx, fy, cx, cy = values
        depth_K = [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]
        try:
            return cls(BIWI_COLOUR_K_PX, depth_K, BIWI_R_DEPTH_TO_COLOUR, BIWI_T_DEPTH_TO_COLOUR_MM, 1.0)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def register_depth(depth_raw: np.ndarray, calib: DepthCalibration, colour_size: tuple[int, int], *,
                   fill_cracks: bool = True, crack_tolerance_mm: float = 10.0,
                   crack_min_neighbours: int = 4) -> np.ndarray:
    """Depth seen from the colour camera: (H, W) float32 mm, the colour camera's z, 0 = no data.

    depth_raw: (Hd, Wd) uint16 (or any real dtype) raw values, 0 = no data; colour_size (W, H) px.
    Each valid depth pixel is back-projected with depth_K, moved into the colour camera and
    projected with colour_K to its nearest pixel; where several land on one pixel the nearest
    surface wins (z-buffer). Forward projection leaves holes where colour pixels are denser than
    the depth pixels landing on them; fill_cracks fills an empty pixel with the nearest of its
    eight neighbours when at least crack_min_neighbours of them have depth and they agree within
    crack_tolerance_mm (so nothing grows across a silhouette or a depth edge).
    """
    W, H = int(colour_size[0]), int(colour_size[1])
    depth = np.asarray(depth_raw)
    if depth.ndim != 2:
        raise ValueError(f"depth_raw must be (H, W), got shape {depth.shape}")
    f32 = np.float32
    # K_c (R K_d⁻¹ z [u v 1] + t) = z P [u v 1] + e: the colour pixel times its z, and that z.
    P = (calib.colour_K @ calib.R_depth_to_colour @ np.linalg.inv(calib.depth_K)).astype(f32)
    e = (calib.colour_K @ calib.t_depth_to_colour_mm).astype(f32)
    out = _splat_depth(np.ascontiguousarray(depth), P, e, f32(calib.depth_unit_mm), W, H)
    if fill_cracks:
        _fill_cracks_in_place(out, crack_tolerance_mm, crack_min_neighbours)
    return out


def fill_depth_cracks(depth_mm: np.ndarray, tolerance_mm: float = 10.0, min_neighbours: int = 4) -> np.ndarray:
    """Empty (0) pixels of (H, W) mm depth whose 8 neighbours hold at least min_neighbours valid
    depths agreeing within tolerance_mm take the nearest of them; the image's outermost rows and
    columns are left as they are. Returns a new float32 array."""
    out = np.array(depth_mm, np.float32)
    _fill_cracks_in_place(out, tolerance_mm, min_neighbours)
    return out


@numba.njit(cache=True, nogil=True)
def _splat_depth(depth, P, e, unit, W, H):
    """register_depth's forward projection with a z-buffer, float32 throughout: (H, W) mm, 0 = none.
    A compiled loop over the depth pixels: numpy's version (np.minimum.at) took 0.96 ms a BIWI
    frame on one core, this 0.5-0.6 (bench/bench_registration.py)."""
    Hd, Wd = depth.shape
    out = np.full((H, W), np.inf, np.float32)
    half, one = np.float32(0.5), np.float32(1.0)
    for v in range(Hd):
        fv = np.float32(v)
        row_z, row_c, row_r = fv * P[2, 1] + P[2, 2], fv * P[0, 1] + P[0, 2], fv * P[1, 1] + P[1, 2]
        for u in range(Wd):
            raw = depth[v, u]
            if not raw > 0:
                continue
            z = np.float32(raw) * unit
            fu = np.float32(u)
            z_colour = (fu * P[2, 0] + row_z) * z + e[2]
            if not z_colour > 0:
                continue
            inv_z = one / z_colour
            col = ((fu * P[0, 0] + row_c) * z + e[0]) * inv_z + half   # floor(x + 0.5): the nearest pixel
            row = ((fu * P[1, 0] + row_r) * z + e[1]) * inv_z + half
            if col >= 0 and col < W and row >= 0 and row < H:
                i, j = int(np.floor(row)), int(np.floor(col))
                if z_colour < out[i, j]:
                    out[i, j] = z_colour
    for i in range(H):
        for j in range(W):
            if out[i, j] == np.inf:
                out[i, j] = 0
    return out


def _fill_cracks_in_place(depth_mm: np.ndarray, tolerance_mm: float, min_neighbours: int) -> None:
    """fill_depth_cracks on a C-contiguous float32 array, changed in place. Only the few empty
    pixels with enough neighbours are looked at, by gathering their 8 neighbours."""
    H, W = depth_mm.shape
    if H < 3 or W < 3:
        return
    valid = (depth_mm > 0).view(np.uint8)
    count = cv2.boxFilter(valid, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    candidate = count >= min_neighbours
    candidate &= valid == 0
    candidate[[0, -1], :] = False
    candidate[:, [0, -1]] = False
    where = np.flatnonzero(candidate)
    if where.size == 0:
        return
    flat = depth_mm.reshape(-1)
    offsets = np.array([-W - 1, -W, -W + 1, -1, 1, W - 1, W, W + 1])
    around = flat[where[:, None] + offsets]  # (K, 8) mm, 0 = empty
    farthest = around.max(axis=1)
    around[around <= 0] = np.inf
    nearest = around.min(axis=1)
    agree = farthest - nearest <= tolerance_mm
    flat[where[agree]] = nearest[agree]


def _valid_box(valid: np.ndarray, margin_px: int) -> tuple[slice, slice] | None:
    """Rows and columns around the valid pixels (with a margin), None when there are none."""
    rows = np.flatnonzero(valid.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(valid.any(axis=0))
    H, W = valid.shape
    return (slice(max(rows[0] - margin_px, 0), min(rows[-1] + 1 + margin_px, H)),
            slice(max(cols[0] - margin_px, 0), min(cols[-1] + 1 + margin_px, W)))


def denoise_depth(depth_mm: np.ndarray, diameter_px: int = 5, sigma_depth_mm: float = 8.0,
                  sigma_space_px: float = 2.0) -> np.ndarray:
    """Edge-preserving smoothing of (H, W) mm depth: a bilateral filter over the valid pixels.

    Sensor noise (a few mm at 1 m) is smoothed; steps much larger than sigma_depth_mm (a face
    against the background) keep their edge, and empty pixels (0), hundreds of mm away from any
    surface, get no weight and stay 0. Runs on the box around the valid pixels only.
    Returns a new (H, W) float32 array.
    """
    depth = np.asarray(depth_mm, np.float32)
    out = np.zeros_like(depth)
    valid = depth > 0
    box = _valid_box(valid, diameter_px)
    if box is None:
        return out
    patch = np.ascontiguousarray(depth[box])
    smooth = cv2.bilateralFilter(patch, int(diameter_px), float(sigma_depth_mm), float(sigma_space_px),
                                 borderType=cv2.BORDER_REPLICATE)
    out[box] = np.where(valid[box], smooth, np.float32(0))
    return out


class TemporalDepthFilter:
    """Per-pixel exponential smoothing of depth over frames: out = prev + alpha·(new − prev).

    Where a pixel's new depth is more than reset_mm from its smoothed one (the surface moved or
    appeared) it restarts from the new value, so motion is not smeared; empty pixels stay empty.
    Holds the previous output between calls; reset() forgets it.
    """

    def __init__(self, alpha: float = 0.5, reset_mm: float = 10.0):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = np.float32(alpha)
        self.reset_mm = float(reset_mm)
        self._previous: np.ndarray | None = None

    def reset(self) -> None:
        self._previous = None

    def __call__(self, depth_mm: np.ndarray) -> np.ndarray:
        depth = np.asarray(depth_mm, np.float32)
        previous = self._previous
        if previous is None or previous.shape != depth.shape:
            out = depth.copy()
        else:
            keep = (depth > 0) & (previous > 0) & (np.abs(depth - previous) <= self.reset_mm)
            out = np.where(keep, previous + self.alpha * (depth - previous), depth)
        self._previous = out
        return out.copy()


def backproject(depth_mm: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-space points (H, W, 3) float32 cm of a (H, W) mm depth image seen through K (px):
    x = (u − cx)·z/fx, y = (v − cy)·z/fy, z = depth. NaN (all three) where depth is 0 or not finite."""
    depth = np.asarray(depth_mm, np.float32)
    H, W = depth.shape
    K = np.asarray(K, np.float64)
    z_cm = depth * np.float32(0.1)
    z_cm[~(depth > 0) | ~np.isfinite(depth)] = np.nan
    x_per_z = ((np.arange(W) - K[0, 2]) / K[0, 0]).astype(np.float32)
    y_per_z = ((np.arange(H) - K[1, 2]) / K[1, 1]).astype(np.float32)
    points = np.empty((H, W, 3), np.float32)
    np.multiply(z_cm, x_per_z[None, :], out=points[..., 0])
    np.multiply(z_cm, y_per_z[:, None], out=points[..., 1])
    points[..., 2] = z_cm
    return points


#: Rows of normals computed together: the temporaries stay small, in the cache and reused.
_NORMAL_BLOCK_ROWS = 32


def organized_normals(points_cm: np.ndarray, step_px: int = 1) -> np.ndarray:
    """Unit normals (H, W, 3) float32 of an organised point grid (H, W, 3), from the central
    differences step_px away along the rows and the columns, turned towards the camera (n·p < 0).
    NaN where the point or any of its four neighbours is NaN, within step_px of the border, and
    where the neighbours do not span a plane."""
    P = np.asarray(points_cm, np.float32)
    H, W, _ = P.shape
    s = int(step_px)
    normals = np.full((H, W, 3), np.nan, np.float32)
    w = W - 2 * s
    if H <= 2 * s or w <= 0:
        return normals
    buffers = np.empty((10, _NORMAL_BLOCK_ROWS, w), np.float32)
    for top in range(s, H - s, _NORMAL_BLOCK_ROWS):
        b = min(_NORMAL_BLOCK_ROWS, H - s - top)
        planes = cv2.split(np.ascontiguousarray(P[top - s:top + b + s]))  # x, y, z of rows top-s ... top+b+s
        du, dv, n = buffers[0:3, :b], buffers[3:6, :b], buffers[6:9, :b]
        tmp = buffers[9, :b]
        for i, plane in enumerate(planes):
            np.subtract(plane[s:s + b, 2 * s:], plane[s:s + b, :w], out=du[i])
            np.subtract(plane[2 * s:, s:s + w], plane[:b, s:s + w], out=dv[i])
        for i in range(3):  # n = du × dv
            j, k = (i + 1) % 3, (i + 2) % 3
            np.multiply(du[j], dv[k], out=n[i])
            n[i] -= np.multiply(du[k], dv[j], out=tmp)
        length, facing = du[0], du[1]  # du is not needed any more
        np.multiply(n[0], n[0], out=length)
        np.multiply(n[0], planes[0][s:s + b, s:s + w], out=facing)
        for i in (1, 2):
            length += np.multiply(n[i], n[i], out=tmp)
            facing += np.multiply(n[i], planes[i][s:s + b, s:s + w], out=tmp)
        np.sqrt(length, out=length)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.divide(np.float32(1), length, out=dv[0])
            np.negative(scale, out=scale, where=facing > 0)  # towards the camera
            scale[length == 0] = np.nan  # no plane
            scale += np.multiply(facing, 0, out=tmp)  # NaN where the point itself is
        n *= scale
        normals[top:top + b, s:W - s] = cv2.merge([n[0], n[1], n[2]])
    return normals


def write_ply_points(path: str | os.PathLike, points: np.ndarray, normals: np.ndarray | None = None,
                     colours: np.ndarray | None = None) -> None:
    """A binary little-endian PLY point cloud: points (N, 3) float32 (cm, as every capture file),
    optional unit normals (N, 3) float32 and colours (N, 3) uint8 RGB. Rows are written as given
    (drop NaN points first). Written under a temporary name, then renamed over path.

    capture.sinks' PLY writer writes whole meshes of a fixed topology; a cloud needs per-point
    normals and colours and no faces, hence this one. Without normals and colours the file has
    the same vertex layout as those meshes (capture.sinks.read_ply reads it, with no faces).
    """
    p = np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {p.shape}")
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    header = ["ply", "format binary_little_endian 1.0", "comment units cm", f"element vertex {len(p)}",
              "property float x", "property float y", "property float z"]
    extras = []
    if normals is not None:
        n = np.asarray(normals)
        if n.shape != p.shape:
            raise ValueError(f"normals must be {p.shape}, got {n.shape}")
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
        header += ["property float nx", "property float ny", "property float nz"]
        extras.append((("nx", "ny", "nz"), n))
    if colours is not None:
        c = np.asarray(colours)
        if c.shape != p.shape or c.dtype != np.uint8:
            raise ValueError(f"colours must be {p.shape} uint8, got {c.shape} {c.dtype}")
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        header += ["property uchar red", "property uchar green", "property uchar blue"]
        extras.append((("red", "green", "blue"), c))
    header.append("end_header")
    rows = np.empty(len(p), dtype=np.dtype(fields))
    for i, name in enumerate("xyz"):
        rows[name] = p[:, i]
    for names, values in extras:
        for i, name in enumerate(names):
            rows[name] = values[:, i]
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(("\n".join(header) + "\n").encode("ascii"))
            file.write(rows.tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
