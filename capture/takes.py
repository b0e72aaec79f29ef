"""Reading a recorded take's track.npz safely, and checking it is a take.

A track.npz is a zip of .npy arrays, and a file from elsewhere may be hostile:
a zip bomb (a few MB that inflate to GBs), a header claiming a huge array,
pickled objects, arrays of the wrong shape. `read_track` reads only the
arrays a take has (TRACK_ARRAYS), refuses pickles, and checks every size
before anything is decompressed or allocated: each array's .npy header must
describe exactly the bytes the zip says it holds, and all of them together
may inflate to at most max(MIN_INFLATED_LIMIT_BYTES, MAX_INFLATION × the
file's size). capture writes track.npz uncompressed (inflation 1), so only
files made elsewhere come near the limit. `validate_track` then checks the
arrays against each other and their meaning (shapes, types, finite values
where a face was found), so that export and stream never see a broken take.
"""
from __future__ import annotations

import math
import os
import zipfile

import numpy as np

from engine.arkit import ARKIT_NAMES

#: Uncompressed bytes a track.npz may inflate to, per byte of the file ...
MAX_INFLATION = 20
#: ... or this many in all, whichever is more (small compressed takes).
MIN_INFLATED_LIMIT_BYTES = 64 << 20

#: Per-frame arrays: name -> (shape after the frame axis, dtype kinds); None: any length.
PER_FRAME = {
    "frame_index": ((), "iu"),
    "time_s": ((), "f"),
    "face_found": ((), "b"),
    "blendshapes": ((len(ARKIT_NAMES),), "f"),
    "expression": ((None,), "f"),
    "rotation": ((3, 3), "f"),
    "translation": ((3,), "f"),
    "landmarks68": ((68, 2), "f"),
    "eyes_ypr_rad": ((2, 3), "f"),
    "identity_per_frame": ((None,), "f"),
    "decoded": ((), "b"),        # False: a frame the source could not decode (older takes lack it)
    "confidence": ((), "f"),     # the tracker's, NaN without a face (older takes lack it)
    "depth_residual_mm": ((), "f"),  # median |model - depth| of an RGB-D frame's fit, NaN without (older: absent)
}
#: Arrays of the whole take: name -> (shape, dtype kinds).
PER_TAKE = {
    "blendshape_names": ((len(ARKIT_NAMES),), "U"),
    "identity": ((None,), "f"),
    "camera_matrix": ((3, 3), "f"),
    "image_size": ((2,), "iu"),
    "fps": ((), "f"),
    "detail_scale_mm": ((), "f"),   # --detail: full scale of detail/NNNNNN.png, NaN without (older: absent)
}
TRACK_ARRAYS = {**PER_FRAME, **PER_TAKE}
#: What every take has had since the first (older ones may lack eyes_ypr_rad, fps, identity_per_frame).
REQUIRED = ("frame_index", "time_s", "face_found", "blendshapes", "rotation", "translation", "landmarks68",
            "image_size")
#: Arrays that must be finite on every frame with a face.
FINITE_WHERE_FOUND = ("blendshapes", "rotation", "translation")
ROTATION_TOLERANCE = 1e-3  # |RᵀR − I| and |det R − 1| for float32 rotations


class TakeError(ValueError):
    """A track.npz that cannot be read or is not a capture take; the message is one line."""


def read_track(path) -> dict[str, np.ndarray]:
    """The known arrays of a track.npz (TRACK_ARRAYS), read with every size checked first.

    Other members are ignored. Raises TakeError for anything that is not a
    readable, size-honest zip of plain .npy arrays.
    """
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = [(info, info.filename[:-4]) for info in z.infolist()
                       if info.filename.endswith(".npy") and info.filename[:-4] in TRACK_ARRAYS]
            inflated = sum(info.file_size for info, _ in members)
            limit = max(MIN_INFLATED_LIMIT_BYTES, MAX_INFLATION * os.path.getsize(path))
            if inflated > limit:
                raise TakeError(f"{path} would inflate to {inflated / 1e6:.0f} MB from "
                                f"{os.path.getsize(path) / 1e6:.1f} MB: refused (a zip bomb?)")
            return {name: _read_member(z, info, name) for info, name in members}
    except TakeError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a hostile file provokes (bad zip, zlib, encryption)
        raise TakeError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> np.ndarray:
    """One .npy member, its header checked against the zip's size before its data is read."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise TakeError(f"{name}: unknown .npy version {version}")
        if dtype.hasobject:
            raise TakeError(f"{name} holds Python objects, which are never loaded")
        header_bytes = f.tell()
        count = math.prod(shape)  # Python ints: a hostile shape cannot overflow
        nbytes = count * dtype.itemsize
        if nbytes != info.file_size - header_bytes:
            raise TakeError(f"{name}: its header says {nbytes} bytes, the file holds "
                            f"{info.file_size - header_bytes}")
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise TakeError(f"{name} is cut short")
    array = np.frombuffer(data, dtype=dtype, count=count)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def validate_track(track: dict[str, np.ndarray], path) -> None:
    """Raises TakeError (one line, naming path) unless track is a capture take."""
    def bad(why: str) -> TakeError:
        return TakeError(f"{path} is not a valid take: {why}")

    missing = [name for name in REQUIRED if name not in track]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    n = track["frame_index"].shape[0] if track["frame_index"].ndim == 1 else -1
    if n < 0:
        raise bad(f"frame_index has shape {track['frame_index'].shape}, expected (frames,)")
    for name, value in track.items():
        tail, kinds = TRACK_ARRAYS[name]
        expected = (n, *tail) if name in PER_FRAME else tail
        if value.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected, value.shape)):
            shown = tuple("K" if e is None else e for e in expected)
            raise bad(f"{name} has shape {value.shape}, expected {shown} for its {n} frames".replace("'K'", "K"))
        if value.dtype.kind not in kinds:
            raise bad(f"{name} has type {value.dtype}")
    if "blendshape_names" in track and tuple(str(s) for s in track["blendshape_names"]) != ARKIT_NAMES:
        raise bad("blendshape_names are not the 52 ARKit names in order")
    if not np.isfinite(track["time_s"]).all():
        raise bad("time_s is not finite on every frame")
    if n and track["frame_index"].min() < 0:
        raise bad("frame_index is negative")
    found = track["face_found"]
    for name in FINITE_WHERE_FOUND:
        if not np.isfinite(track[name][found]).all():
            raise bad(f"{name} is not finite on every frame with a face")
    shapes = track["blendshapes"][found]
    if shapes.size and not (shapes.min() >= 0.0 and shapes.max() <= 1.0):
        raise bad("blendshapes outside [0, 1]")
    rotations = track["rotation"][found].astype(np.float64)
    if len(rotations):
        off = np.abs(np.einsum("nji,njk->nik", rotations, rotations) - np.eye(3)).max()
        if off > ROTATION_TOLERANCE or np.abs(np.linalg.det(rotations) - 1.0).max() > ROTATION_TOLERANCE:
            raise bad("rotation holds matrices that are not rotations")


def load_take(path) -> dict[str, np.ndarray]:
    """read_track, then validate_track: a take that export and stream can use."""
    track = read_track(path)
    validate_track(track, path)
    return track
