"""Per-actor calibration of the expression weights: the performer's neutral face reads 0.

The fitted weights are not 0 on a neutral face: the face model cannot reproduce every
resting face exactly (heavy lids read as eyeBlink, a wide mouth as mouthStretch), so an
avatar driven by raw weights never rests. As VTuber tools and ARKit apps do, calibration
measures the performer's own neutral and, optionally, how far each of their extremes
reaches, and rescales every shape:

    calibrated = clip((weight - neutral) / max(peak - neutral, MIN_RANGE), 0, 1)

`ActorProfile` holds one performer's identity, neutral and peaks and is kept as a TOML
file a person can read and edit; `AutoNeutral` estimates the neutral during a take when no
profile is given. The eyeLook shapes are set from the measured gaze (engine.gaze), not
from the face's shape, so calibration never touches them.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "capture-actor-profile"
VERSION = 1
#: The smallest peak - neutral range a shape is divided by: a peak measured at (or below)
#: the neutral must not blow small movements up to 1.
MIN_RANGE = 0.05
#: Shapes pinned by gaze (engine.gaze.eye_look_weights), never calibrated.
GAZE_PREFIX = "eyeLook"
#: Identity weights a take locks (engine.fitting.LandmarkBasis's default; track.npz's `identity`).
N_IDENTITY = 60


class CalibrationError(Exception):
    """An actor profile that cannot be used, or a calibration without data; str() is one line."""


def gaze_shapes(shape_names) -> np.ndarray:
    """(M,) bool: the shapes gaze sets (eyeLook*), which calibration leaves alone."""
    return np.array([str(n).startswith(GAZE_PREFIX) for n in shape_names], dtype=bool)


def calibrate(expression: np.ndarray, neutral: np.ndarray, peak: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(..., M) weights -> clip((e - neutral) / max(peak - neutral, MIN_RANGE), 0, 1);
    the shapes where keep (M,) is True pass unchanged."""
    e = np.asarray(expression, dtype=np.float64)
    scaled = np.clip((e - neutral) / np.maximum(peak - neutral, MIN_RANGE), 0.0, 1.0)
    return np.where(keep, e, scaled)


def neutral_from_frames(expressions: np.ndarray, activity: np.ndarray | None = None,
                        quiet_fraction: float = 0.25, ignore: np.ndarray | None = None) -> np.ndarray:
    """(M,) neutral weights: the per-shape median over the quietest frames of (F, M) expressions.

    Quietest: the quiet_fraction of frames with the lowest activity (F,) (e.g. landmark
    motion), by default the frame's total activation. A performance is mostly near rest, so
    its quietest quarter is the face at rest, with blinks and words left out; the median
    ignores the odd frame that is quiet for another reason. Shapes in ignore (M,) bool
    (gaze) count towards no activity and get neutral 0. Frames with a NaN (no face) are
    skipped; ValueError when none is left.
    """
    e = np.asarray(expressions, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"expressions must be (frames, shapes), got shape {e.shape}")
    ignore = np.zeros(e.shape[1], dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool)
    if activity is None:
        activity = e[:, ~ignore].sum(axis=1)
    activity = np.asarray(activity, dtype=np.float64)
    if activity.shape != (len(e),):
        raise ValueError(f"activity must have one value per frame ({len(e)}), got shape {activity.shape}")
    usable = np.isfinite(e).all(axis=1) & np.isfinite(activity)
    if not usable.any():
        raise ValueError("no frame with a face to take the neutral from")
    e, activity = e[usable], activity[usable]
    n = min(len(e), max(1, math.ceil(quiet_fraction * len(e))))
    quiet = np.argpartition(activity, n - 1)[:n]
    neutral = np.median(e[quiet], axis=0)
    neutral[ignore] = 0.0
    return neutral


def peaks_from_frames(expressions: np.ndarray, neutral: np.ndarray, percentile: float = 98.0,
                      min_rise: float = 0.2, shapes: np.ndarray | None = None) -> np.ndarray:
    """(M,) peaks: each shape's percentile over (F, M) expressions where it rises more than
    min_rise above the neutral, else 1.0 (not measured: a shape the performer hardly moved
    says nothing about how far it goes). Only shapes in `shapes` (M,) bool are measured."""
    e = np.asarray(expressions, dtype=np.float64)
    e = e[np.isfinite(e).all(axis=1)]
    peak = np.ones(e.shape[1])
    if len(e) == 0:
        return peak
    reach = np.percentile(e, percentile, axis=0)
    measured = reach > np.asarray(neutral) + min_rise
    if shapes is not None:
        measured &= np.asarray(shapes, dtype=bool)
    peak[measured] = reach[measured]
    return peak


@dataclass(frozen=True, eq=False)
class ActorProfile:
    """One performer's calibration, reusable across takes.

    identity (N_IDENTITY,) the locked identity weights; neutral (M,) the weights of their
    neutral face; peak (M,) the weights their full extremes reach (1.0 where not measured);
    shape_names (M,) the face model's expression names, in the model's order. name, source
    (what it was measured on) and frames (how many) are for people reading the file.
    The gaze shapes always have neutral 0 and peak 1.
    """

    identity: np.ndarray
    neutral: np.ndarray
    peak: np.ndarray
    shape_names: tuple[str, ...]
    name: str = ""
    source: str = ""
    frames: int = 0
    gaze: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        names = tuple(str(n) for n in self.shape_names)
        M = len(names)
        gaze = gaze_shapes(names)
        arrays = {}
        for key in ("identity", "neutral", "peak"):
            a = np.array(getattr(self, key), dtype=np.float64)
            if a.ndim != 1 or (key != "identity" and len(a) != M):
                want = "one dimension" if key == "identity" else f"({M},), one weight per shape"
                raise ValueError(f"{key} must be {want}, got shape {a.shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"{key} has non-finite values")
            arrays[key] = a
        arrays["neutral"][gaze] = 0.0
        arrays["peak"][gaze] = 1.0
        for key, a in arrays.items():
            a.flags.writeable = False
            object.__setattr__(self, key, a)
        object.__setattr__(self, "shape_names", names)
        object.__setattr__(self, "gaze", gaze)

    @classmethod
    def from_identity(cls, identity: np.ndarray, shape_names, **metadata) -> "ActorProfile":
        """A profile that only fixes the identity: neutral 0, peak 1 (weights pass unchanged)."""
        M = len(shape_names)
        return cls(identity, np.zeros(M), np.ones(M), tuple(shape_names), **metadata)

    def apply(self, expression: np.ndarray) -> np.ndarray:
        """(M,) or (F, M) fitted weights -> the same shape, calibrated to this performer."""
        return calibrate(expression, self.neutral, self.peak, self.gaze)

    # ------------------------------------------------------------------ file

    def to_toml(self) -> str:
        """The profile as TOML text: shapes by name, one a line, so a person can edit them."""
        def number(v: float) -> str:
            return f"{v:.6f}"

        lines = [
            "# capture actor profile: one performer's calibration (see README.md, Calibration).",
            "# Each shape is mapped as clip((weight - neutral) / max(peak - neutral, "
            f"{MIN_RANGE}), 0, 1): neutral is",
            "# its weight on this performer's neutral face, peak the weight of their full extreme",
            "# (1.0: not measured). The eyeLook* shapes follow gaze and are never calibrated.",
            f"format = {json.dumps(FORMAT)}",
            f"version = {VERSION}",
            f"name = {json.dumps(self.name, ensure_ascii=False)}",
            f"source = {json.dumps(self.source, ensure_ascii=False)}",
            f"frames = {int(self.frames)}",
            f"# the face model's first {len(self.identity)} identity weights, locked from the first frame",
            "identity = [",
        ]
        for i in range(0, len(self.identity), 6):
            lines.append("  " + ", ".join(number(v) for v in self.identity[i:i + 6]) + ",")
        lines.append("]")
        for table, values in (("neutral", self.neutral), ("peak", self.peak)):
            lines += ["", f"[{table}]"]
            lines += [f"{n} = {number(v)}" for n, v, g in zip(self.shape_names, values, self.gaze) if not g]
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the TOML file atomically (a reader never sees half of it); returns its path."""
        path = Path(path)
        text = self.to_toml()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, shape_names, n_identity: int = N_IDENTITY) -> "ActorProfile":
        """Read a profile for a face model with these expression names; CalibrationError
        (one line naming the file) when it is missing, not TOML or does not fit the model."""
        path = Path(path)
        if not path.exists():
            raise CalibrationError(f"actor profile not found: {path}")
        if not path.is_file():
            raise CalibrationError(f"actor profile {path} is not a file")
        try:
            data = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise CalibrationError(f"actor profile {path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise CalibrationError(f"actor profile {path} is not valid TOML: {_one_line(exc)}") from None
        except OSError as exc:
            raise CalibrationError(f"cannot read actor profile {path}: {exc.strerror or exc}") from None

        def bad(problem: str) -> CalibrationError:
            return CalibrationError(f"actor profile {path}: {_one_line(problem)}")

        if data.get("format") != FORMAT:
            raise bad(f"not a capture actor profile (format = {data.get('format')!r}, want {FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise bad(f"bad version {version!r}")
        if version > VERSION:
            raise bad(f"version {version} is newer than this capture reads ({VERSION})")
        names = tuple(str(n) for n in shape_names)
        gaze = gaze_shapes(names)
        identity = data.get("identity")
        if not isinstance(identity, list):
            raise bad("no identity list")
        if len(identity) != n_identity:
            raise bad(f"identity has {len(identity)} weights, want {n_identity}")
        identity = np.array([_number(v, "identity", bad) for v in identity])
        tables = {}
        calibrated = [n for n, g in zip(names, gaze) if not g]
        for table in ("neutral", "peak"):
            values = data.get(table)
            if not isinstance(values, dict):
                raise bad(f"no [{table}] table")
            unknown = sorted(set(values) - set(calibrated))
            missing = [n for n in calibrated if n not in values]
            if unknown:
                why = "set by gaze, not calibrated" if all(n in names for n in unknown) else "unknown shape"
                raise bad(f"[{table}] {', '.join(unknown)}: {why}")
            if missing:
                raise bad(f"[{table}] lacks {len(missing)} shape(s): {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
            column = np.zeros(len(names)) if table == "neutral" else np.ones(len(names))
            for n in calibrated:
                v = _number(values[n], f"[{table}] {n}", bad)
                if not 0.0 <= v <= 1.0:
                    raise bad(f"[{table}] {n} = {v} is outside [0, 1]")
                column[names.index(n)] = v
            tables[table] = column
        name, source, frames = data.get("name", ""), data.get("source", ""), data.get("frames", 0)
        if not isinstance(name, str) or not isinstance(source, str):
            raise bad("name and source must be strings")
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 0:
            raise bad(f"frames must be a count, got {frames!r}")
        return cls(identity, tables["neutral"], tables["peak"], names, name, source, frames)


def _number(value, where: str, bad) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{where} is {value!r}, not a number")
    if not math.isfinite(value):
        raise bad(f"{where} is {value}, not a finite number")
    return float(value)


def _one_line(message) -> str:
    return " ".join(str(message).split())


class AutoNeutral:
    """The neutral estimated during a take, for when no profile is given.

    Call it with each frame's (M,) fitted weights; it returns them calibrated (the neutral
    subtracted, no peak scaling). The first warm_up_frames pass unchanged; then the
    neutral is neutral_from_frames over the frames so far, re-estimated every
    every_frames frames (0.03 ms each time; nothing is sorted per frame) until window_frames
    frames are in, and frozen from there (10 s at 30 frames/s).

    Frozen, not a sliding window: a sliding window's quietest frames follow whatever the
    performer holds, so a smile held for ten seconds would become the neutral and fade
    out of the avatar; a take's first seconds almost always show the face at rest
    between words. A performer who starts with a held expression needs a profile
    (`capture calibrate`).
    """

    def __init__(self, shape_names, warm_up_frames: int = 30, window_frames: int = 300,
                 every_frames: int = 15, quiet_fraction: float = 0.25):
        if not 1 <= warm_up_frames <= window_frames or every_frames < 1:
            raise ValueError("need 1 <= warm_up_frames <= window_frames and every_frames >= 1")
        self.keep = gaze_shapes(shape_names)
        self.warm_up_frames, self.window_frames = warm_up_frames, window_frames
        self.every_frames, self.quiet_fraction = every_frames, quiet_fraction
        self._frames = np.zeros((window_frames, len(self.keep)))
        self.count = 0  # frames seen, up to window_frames
        self.neutral: np.ndarray | None = None
        self._peak: np.ndarray | None = None

    @property
    def frozen(self) -> bool:
        return self.count >= self.window_frames

    def __call__(self, expression: np.ndarray) -> np.ndarray:
        e = np.asarray(expression, dtype=np.float64)
        if not self.frozen and np.isfinite(e).all():
            self._frames[self.count] = e
            self.count += 1
            due = (self.count - self.warm_up_frames) % self.every_frames == 0
            if self.count >= self.warm_up_frames and (due or self.frozen):
                self.neutral = neutral_from_frames(self._frames[:self.count], quiet_fraction=self.quiet_fraction,
                                                   ignore=self.keep)
                self._peak = self.neutral + 1.0  # a range of 1: subtract, do not rescale
        if self.neutral is None:
            return e.copy()
        return calibrate(e, self.neutral, self._peak, self.keep)
