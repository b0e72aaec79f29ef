"""Build the face model archive from the upstream ICT-FaceKit `FaceXModel/` folder, and back.

`capture model import FACEXMODEL_DIR` calls `import_facexmodel`, which turns the
folder of OBJ files (github.com/ICT-VGL/ICT-FaceKit, folder `FaceXModel`) into
the single .npz that `engine.facemodel.FaceModel.load` reads. Given the upstream
folder it writes the same file as ../shared/facemodel/ict_face_model_light.npz,
byte for byte. The conventions, as found in that file:

* `neutral`, `uv`: the `v` and `vt` lines of `generic_neutral_mesh.obj`, parsed
  as float64 and stored as float32.
* `triangles`, `triangle_uv`: its `f` lines (`v`, `v/vt`, `v//vn`, `v/vt/vn`;
  negative, relative indices allowed), polygons split as a fan from their first
  corner: (a, b, c, d) -> (a, b, c), (a, c, d). Corners without a `vt` get -1.
* `triangle_material`, `materials`: `usemtl` names in order of first use
  (M_Face, M_BackHead, ...); faces before any `usemtl` use "default".
* `identity_modes`, `expression_modes`: each OBJ's vertices (float64) minus
  the neutral's (float64), stored as float16. Only `v` lines of those files are
  read; they must have the neutral's vertex count.
* `identity_names`: identity000, identity001, ... (all `identityNNN.obj`,
  numbered from 0 without gaps).
* `expression_names`: the `"expressions"` list of `vertex_indices.json`, in
  its order, as upstream's own loader does (the folder holds other OBJs that
  are not model shapes in some upstream versions); without that list, every
  other OBJ in the folder, sorted by name.
* `vertex_indices_json`: the json file re-serialised with `json.dumps` (default
  separators, key order kept), a 0-d str array.

`export_facexmodel` writes an archive back out as such a folder (full meshes,
triangulated), for round-trip tests and for anyone who wants the shapes as OBJs.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

NEUTRAL_MESH = "generic_neutral_mesh.obj"
VERTEX_INDICES = "vertex_indices.json"
MATERIAL_LIBRARY = "ICTFaceModelMaterial.mtl"
DEFAULT_MATERIAL = "default"

#: Key order of the archive (np.savez_compressed keeps it; the file is then deterministic).
ARCHIVE_KEYS = (
    "neutral",
    "triangles",
    "uv",
    "triangle_uv",
    "triangle_material",
    "materials",
    "identity_modes",
    "identity_names",
    "expression_modes",
    "expression_names",
    "vertex_indices_json",
)

_IDENTITY_RE = re.compile(r"identity(\d+)$")

Progress = Callable[[int, int], None]


class ModelImportError(RuntimeError):
    """The FaceXModel folder is missing, incomplete or malformed."""


# --------------------------------------------------------------------------- OBJ reading


@dataclass
class ObjMesh:
    """A polygon mesh read from an OBJ file, triangulated."""

    vertices: np.ndarray  # (V, 3) float64
    uv: np.ndarray  # (U, 2) float64
    triangles: np.ndarray  # (T, 3) int32
    triangle_uv: np.ndarray  # (T, 3) int32, -1 where a corner has no vt
    triangle_material: np.ndarray  # (T,) int16
    materials: tuple[str, ...]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelImportError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _parse_floats(lines: Sequence[bytes], width: int, keyword: str, path: Path) -> np.ndarray:
    """(N, width) float64 from lines holding the numbers after an OBJ keyword."""
    if not lines:
        return np.zeros((0, width), np.float64)
    try:  # fast path: every line holds exactly `width` numbers
        flat = np.array(b" ".join(lines).split(), dtype=np.float64)
        if flat.size == width * len(lines):
            return flat.reshape(-1, width)
    except ValueError:
        pass
    out = np.empty((len(lines), width), np.float64)  # extra columns (v x y z w, vertex colours): keep the first
    for i, line in enumerate(lines):
        tokens = line.split()
        try:
            if len(tokens) < width:
                raise ValueError
            out[i] = [float(t) for t in tokens[:width]]
        except ValueError:
            text = line.decode("utf-8", "replace").strip()
            raise ModelImportError(f"{path}: malformed '{keyword}' entry #{i + 1}: '{keyword} {text}'") from None
    return out


def _keyword_lines(data: bytes, keyword: bytes) -> list[bytes]:
    """The rest of every line starting with `keyword` and a blank (space or tab)."""
    k = len(keyword)
    prefixes = (keyword + b" ", keyword + b"\t")
    # only split the span from the first to the last such line (OBJs list all `v` before `vt` and `f`)
    starts = [0] if data.startswith(prefixes) else []
    starts += [i + 1 for i in (data.find(b"\n" + p) for p in prefixes) if i >= 0]
    if not starts:
        return []
    last = max(data.rfind(b"\n" + p) for p in prefixes)
    end = data.find(b"\n", last + 1) if last >= 0 else data.find(b"\n")
    region = data[min(starts) : end if end >= 0 else len(data)]
    return [line[k:] for line in region.splitlines() if line.startswith(prefixes)]


def read_obj_vertices(path: str | os.PathLike) -> np.ndarray:
    """(V, 3) float64 `v` positions of an OBJ file; every other line is skipped."""
    path = Path(path)
    return _parse_floats(_keyword_lines(_read_bytes(path), b"v"), 3, "v", path)


def read_obj_mesh(path: str | os.PathLike) -> ObjMesh:
    """Vertices, texture coordinates, triangulated faces and material groups of an OBJ file."""
    path = Path(path)
    data = _read_bytes(path)
    v_lines: list[bytes] = []
    vt_lines: list[bytes] = []
    tri_v: list[tuple[int, int, int]] = []
    tri_t: list[tuple[int, int, int]] = []
    tri_m: list[int] = []
    materials: list[str] = []
    material_index: dict[str, int] = {}
    current = -1

    def index(token: bytes, count: int, what: str, lineno: int) -> int:
        i = int(token)
        if i < 0:
            i += count  # relative: -1 is the latest one defined
        else:
            i -= 1
        if not 0 <= i < count:
            raise ModelImportError(f"{path}: line {lineno}: {what} index {token.decode()} out of range 1..{count}")
        return i

    for lineno, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] == 35:  # '#'
            continue
        head, *tail = line.split(None, 1)
        rest = tail[0] if tail else b""
        if head == b"v":
            v_lines.append(rest)
        elif head == b"vt":
            vt_lines.append(rest)
        elif head == b"usemtl":
            name = rest.strip().decode("utf-8", "replace") or DEFAULT_MATERIAL
            if name not in material_index:
                material_index[name] = len(materials)
                materials.append(name)
            current = material_index[name]
        elif head == b"f":
            corners = rest.split()
            if len(corners) < 3:
                raise ModelImportError(f"{path}: line {lineno}: face with fewer than 3 corners")
            vi: list[int] = []
            ti: list[int] = []
            try:
                for corner in corners:
                    parts = corner.split(b"/")
                    vi.append(index(parts[0], len(v_lines), "vertex", lineno))
                    ti.append(index(parts[1], len(vt_lines), "uv", lineno) if len(parts) > 1 and parts[1] else -1)
            except ValueError:
                raise ModelImportError(f"{path}: line {lineno}: malformed face '{line.decode('utf-8', 'replace')}'") from None
            if current < 0:
                material_index[DEFAULT_MATERIAL] = current = len(materials)
                materials.append(DEFAULT_MATERIAL)
            for k in range(1, len(vi) - 1):  # fan from the first corner
                tri_v.append((vi[0], vi[k], vi[k + 1]))
                tri_t.append((ti[0], ti[k], ti[k + 1]))
                tri_m.append(current)
        # vn, g, o, s, l, mtllib, ...: not needed

    if len(materials) > np.iinfo(np.int16).max:
        raise ModelImportError(f"{path}: too many materials ({len(materials)})")
    return ObjMesh(
        vertices=_parse_floats(v_lines, 3, "v", path),
        uv=_parse_floats(vt_lines, 2, "vt", path),
        triangles=np.array(tri_v, dtype=np.int32).reshape(-1, 3),
        triangle_uv=np.array(tri_t, dtype=np.int32).reshape(-1, 3),
        triangle_material=np.array(tri_m, dtype=np.int16),
        materials=tuple(materials),
    )


# --------------------------------------------------------------------------- import


def _identity_files(folder: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for p in folder.glob("identity*.obj"):
        m = _IDENTITY_RE.fullmatch(p.stem)
        if m and p.is_file():
            found[int(m.group(1))] = p
    for k in range(len(found)):
        if k not in found:
            raise ModelImportError(f"{folder / f'identity{k:03d}.obj'} is missing (identity OBJs must be numbered from 000 without gaps)")
    return [found[k] for k in range(len(found))]


def _expression_files(folder: Path, config: dict, identity_files: Iterable[Path]) -> list[Path]:
    names = config.get("expressions")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelImportError(f"{folder / VERTEX_INDICES}: 'expressions' is not a list of names")
        files = [folder / f"{n}.obj" for n in names]
        for p in files:
            if not p.is_file():
                raise ModelImportError(f"{p} is missing (listed in {VERTEX_INDICES} 'expressions')")
    else:
        skip = {NEUTRAL_MESH, *(p.name for p in identity_files)}
        files = sorted((p for p in folder.glob("*.obj") if p.name not in skip and p.is_file()), key=lambda p: p.stem)
    if not files:
        raise ModelImportError(f"no expression OBJs in {folder} (expected browDown_L.obj, jawOpen.obj, ...)")
    return files


def _read_config(folder: Path) -> tuple[str, dict]:
    path = folder / VERTEX_INDICES
    if not path.is_file():
        raise ModelImportError(f"{path} is missing (it holds the landmark vertex indices)")
    try:
        config = json.loads(_read_bytes(path).decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelImportError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelImportError(f"{path} does not hold a JSON object")
    return json.dumps(config), config


def _modes(files: Sequence[Path], neutral: np.ndarray, tick: Callable[[], None]) -> np.ndarray:
    modes = np.empty((len(files), *neutral.shape), np.float16)
    for k, path in enumerate(files):
        v = read_obj_vertices(path)
        if v.shape != neutral.shape:
            raise ModelImportError(f"{path}: {len(v)} vertices, expected {len(neutral)} as in {NEUTRAL_MESH}")
        np.subtract(v, neutral, out=v)
        modes[k] = v  # float64 -> float16, rounded to nearest
        tick()
    return modes


def load_facexmodel(folder: str | os.PathLike, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """The archive's arrays (keys as ARCHIVE_KEYS) from a FaceXModel folder, without writing anything."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelImportError(f"FaceXModel folder not found: {folder}")
    neutral_path = folder / NEUTRAL_MESH
    if not neutral_path.is_file():
        raise ModelImportError(f"{neutral_path} is missing: is {folder} the ICT-FaceKit FaceXModel folder?")
    json_text, config = _read_config(folder)
    identity_files = _identity_files(folder)
    expression_files = _expression_files(folder, config, identity_files)

    total = 1 + len(identity_files) + len(expression_files)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    mesh = read_obj_mesh(neutral_path)
    if len(mesh.vertices) == 0 or len(mesh.triangles) == 0:
        raise ModelImportError(f"{neutral_path}: no vertices or no faces")
    tick()
    identity_modes = _modes(identity_files, mesh.vertices, tick)
    expression_modes = _modes(expression_files, mesh.vertices, tick)
    return {
        "neutral": mesh.vertices.astype(np.float32),
        "triangles": mesh.triangles,
        "uv": mesh.uv.astype(np.float32),
        "triangle_uv": mesh.triangle_uv,
        "triangle_material": mesh.triangle_material,
        "materials": np.array(mesh.materials, dtype=str),
        "identity_modes": identity_modes,
        "identity_names": np.array([p.stem for p in identity_files], dtype=str),
        "expression_modes": expression_modes,
        "expression_names": np.array([p.stem for p in expression_files], dtype=str),
        "vertex_indices_json": np.array(json_text),
    }


def _write_archive(arrays: dict[str, np.ndarray], out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".part", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{k: arrays[k] for k in ARCHIVE_KEYS})
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_facexmodel(folder: str | os.PathLike, out_path: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Convert an ICT-FaceKit FaceXModel folder into the face model .npz at out_path.

    progress(done, total) is called after each OBJ file. Raises ModelImportError
    on a missing folder, neutral mesh, vertex_indices.json or expression OBJs, and
    on OBJs whose vertex count differs from the neutral mesh's. The file is
    written atomically (a temporary file beside it, then renamed).
    """
    arrays = load_facexmodel(folder, progress)
    out_path = Path(out_path).expanduser()
    try:
        _write_archive(arrays, out_path)
    except OSError as exc:
        raise ModelImportError(f"cannot write {out_path}: {exc.strerror or exc}") from exc
    return out_path


# --------------------------------------------------------------------------- export


def _fmt_rows(prefix: str, rows: np.ndarray, fmt: str) -> list[str]:
    line = prefix + " ".join([fmt] * rows.shape[1])
    return [line % tuple(r) for r in rows.tolist()]


def _face_block(arrays: dict[str, np.ndarray]) -> str:
    """`vt`, `usemtl` and `f` lines of the model's triangles (1-based, `v/vt` or `v`)."""
    uv = np.asarray(arrays["uv"], np.float32)
    tri = np.asarray(arrays["triangles"], np.int64) + 1
    tuv = np.asarray(arrays["triangle_uv"], np.int64)
    mat = np.asarray(arrays["triangle_material"], np.int64)
    names = [str(m) for m in arrays["materials"]]
    lines = _fmt_rows("vt ", uv, "%.9g")
    has_uv = (tuv >= 0).all(axis=1)
    starts = np.flatnonzero(np.r_[True, mat[1:] != mat[:-1]])
    ends = np.r_[starts[1:], len(mat)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        lines.append(f"usemtl {names[mat[s]]}")
        for a, t, ok in zip(tri[s:e].tolist(), (tuv[s:e] + 1).tolist(), has_uv[s:e].tolist()):
            if ok:
                lines.append(f"f {a[0]}/{t[0]} {a[1]}/{t[1]} {a[2]}/{t[2]}")
            else:
                lines.append(f"f {a[0]} {a[1]} {a[2]}")
    return "\n".join(lines) + "\n"


def _mode_positions(neutral64: np.ndarray, mode: np.ndarray) -> np.ndarray:
    """float64 positions p with float16(p - neutral64) == mode bit for bit (signed zeros included)."""
    d = mode.astype(np.float64)
    p = neutral64 + d
    negzero = (d == 0) & np.signbit(d)
    if negzero.any():  # a tiny step below the neutral rounds to -0.0 as upstream's tiny offsets do
        p[negzero] = np.where(neutral64[negzero] == 0, -1e-30, np.nextafter(neutral64[negzero], -np.inf))
    back = (p - neutral64).astype(np.float16)
    if not np.array_equal(back.view(np.uint16), np.asarray(mode, np.float16).view(np.uint16)):
        raise ModelImportError("internal error: exported positions do not reproduce the modes")
    return p


def _mode_lines(neutral64: np.ndarray, mode: np.ndarray) -> list[str]:
    """`v` lines of neutral + mode: 10 significant digits, or all 17 where that is needed to read back exact."""
    p = _mode_positions(neutral64, mode)
    lines = _fmt_rows("v ", p, "%.10g")
    short = np.array(" ".join(line[2:] for line in lines).split(), dtype=np.float64).reshape(p.shape)
    bits = np.asarray(mode, np.float16).view(np.uint16)
    bad = np.flatnonzero(((short - neutral64).astype(np.float16).view(np.uint16) != bits).any(axis=1))
    for i in bad.tolist():
        lines[i] = "v %r %r %r" % tuple(p[i].tolist())
    return lines


def export_facexmodel(
    npz_path: str | os.PathLike,
    folder: str | os.PathLike,
    identity_count: int | None = None,
    expression_names: Sequence[str] | None = None,
    faces: bool = True,
) -> Path:
    """Write a face model archive as a FaceXModel folder that `import_facexmodel` reads back.

    identity_count limits the identity OBJs to the first k; expression_names picks
    expression shapes (in that order; default all). Mode OBJs are full meshes
    (neutral + mode), with the neutral's uv and triangles unless faces=False.
    Positions are written so that importing gives back the same float16 modes
    exactly; importing the full export reproduces the archive byte for byte.
    """
    with np.load(Path(npz_path).expanduser(), allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    missing = [k for k in ARCHIVE_KEYS if k not in arrays]
    if missing:
        raise ModelImportError(f"{npz_path} lacks {', '.join(missing)}")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)

    n_id = len(arrays["identity_modes"])
    k_id = n_id if identity_count is None else int(identity_count)
    if not 0 <= k_id <= n_id:
        raise ValueError(f"identity_count must be in 0..{n_id}, got {identity_count}")
    all_names = [str(n) for n in arrays["expression_names"]]
    names = all_names if expression_names is None else [str(n) for n in expression_names]
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise ValueError(f"unknown expression names: {', '.join(unknown)}")

    config_text = str(arrays["vertex_indices_json"])
    if names != all_names:  # the json's list names the files to import
        config = json.loads(config_text)
        config["expressions"] = list(names)
        if isinstance(config.get("fitting_expressions"), list):
            config["fitting_expressions"] = [n for n in config["fitting_expressions"] if n in names]
        config_text = json.dumps(config)
    (folder / VERTEX_INDICES).write_text(config_text, encoding="utf-8")

    materials = [str(m) for m in arrays["materials"]]
    (folder / MATERIAL_LIBRARY).write_text(
        "".join(f"newmtl {m}\nKd 0.8 0.8 0.8\n\n" for m in materials), encoding="utf-8"
    )

    header = f"# written by capture (engine/model_import.py) from {Path(npz_path).name}\nmtllib {MATERIAL_LIBRARY}\n"
    neutral_lines = _fmt_rows("v ", np.asarray(arrays["neutral"], np.float32), "%.9g")
    # the float64 values an importer reads back, which the mode positions are relative to
    neutral64 = np.array(" ".join(line[2:] for line in neutral_lines).split(), dtype=np.float64).reshape(-1, 3)
    face_block = _face_block(arrays)
    with open(folder / NEUTRAL_MESH, "w", encoding="utf-8", newline="\n") as f:
        f.write(header)
        f.write("\n".join(neutral_lines) + "\n")
        f.write(face_block)

    jobs = [(f"identity{k:03d}", arrays["identity_modes"][k]) for k in range(k_id)]
    jobs += [(n, arrays["expression_modes"][all_names.index(n)]) for n in names]
    for name, mode in jobs:
        lines = _mode_lines(neutral64, mode)
        with open(folder / f"{name}.obj", "w", encoding="utf-8", newline="\n") as f:
            f.write(header)
            f.write("\n".join(lines) + "\n")
            if faces:
                f.write(face_block)
    return folder
