"""Expression weights from the shape of MediaPipe's 478 landmarks: a small MLP on the aligned points.

Why: CoarseNet reads the landmarks in crop pixels beside the crop, and on exact-truth clips it
under-reads most shapes (brows, cheeks, puckers, the lower lip: its mean value a tenth of the
truth's), which left its blendshapes barely better than all zeros. Once translation, scale and
in-plane rotation are taken out (`aligned_shape`), what is left of the landmarks is identity, the
head's turn and the expression, and an MLP trained on that alone (trainers.train_landmark_expression,
on the synthetic shards' tracked landmarks) reads the expression better than the network does.
A shape takes the MLP's value only where, on the validation shard, it was both closer to the truth
and followed it better than the network (`use`, stored with the weights): a shape the landmarks
cannot see (a cheek puff) the MLP reads as a constant 0, and it keeps the network's reading.

The MLP runs in numpy: three dense layers, about 0.6 M multiply-adds, about 0.2 ms a frame on one core.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "landmark_expression.npz"
#: The aligned points are scaled by this before the MLP (unit RMS radius -> inputs of order 1).
FEATURE_SCALE = 10.0
FORMAT = "capture.landmark_expression/1"


class LandmarkExpressionError(Exception):
    """A weights file that is missing or is not a landmark-expression MLP; the message is one line."""


def aligned_shape(points_px: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(..., N, 2) points (px) -> (..., N, 2): centred, scaled to unit RMS distance from the centroid,
    and, given a reference (N, 2) of that form, turned in-plane onto it (least squares; no mirroring).
    The result does not change when the points are moved, scaled or turned in the image plane."""
    p = np.asarray(points_px, np.float64)
    z = p[..., 0] + 1j * p[..., 1]                     # points as complex numbers: a turn is a product
    z = z - z.mean(axis=-1, keepdims=True)
    z = z / np.maximum(np.sqrt((np.abs(z) ** 2).mean(axis=-1, keepdims=True)), 1e-12)
    if reference is not None:
        ref = np.asarray(reference, np.float64)
        w = (np.conj(z) * (ref[:, 0] + 1j * ref[:, 1])).sum(axis=-1, keepdims=True)  # best turn: arg(w)
        z = z * (w / np.maximum(np.abs(w), 1e-300))
    return np.stack([z.real, z.imag], axis=-1)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh form (torch.nn.GELU(approximate="tanh"), what training uses)."""
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


@dataclass
class LandmarkExpression:
    """The trained MLP: reference (N, 2) aligned shape, mean (N, 2) of the training shapes,
    layers [(W (in, out), b (out,)), ...] float32, GELU between them; use (M,) bool: the shapes
    whose value replaces the network's."""

    reference: np.ndarray
    mean: np.ndarray
    layers: list
    use: np.ndarray

    @classmethod
    def load(cls, path: str | Path | None = None) -> "LandmarkExpression":
        """The weights at path (None: DEFAULT_WEIGHTS, shipped with capture)."""
        path = Path(DEFAULT_WEIGHTS if path is None else path)
        if not path.is_file():
            raise LandmarkExpressionError(f"landmark-expression weights not found: {path} "
                                          "(python -m trainers.train_landmark_expression writes them; "
                                          "--expression network or solve runs without them)")
        try:
            with np.load(path) as d:
                if str(d["format"]) != FORMAT:
                    raise ValueError(f"format {d['format']}")
                n = int(d["n_layers"])
                layers = [(d[f"W{i}"].astype(np.float32), d[f"b{i}"].astype(np.float32)) for i in range(n)]
                return cls(d["reference"].astype(np.float64), d["mean"].astype(np.float64), layers,
                           d["use"].astype(bool))
        except Exception as exc:  # noqa: BLE001 - zip, key and shape errors all mean "not this file"
            raise LandmarkExpressionError(f"{path} is not a landmark-expression weights file ({exc})") from exc

    def save(self, path: str | Path) -> None:
        arrays = {f"W{i}": W for i, (W, _) in enumerate(self.layers)}
        arrays.update({f"b{i}": b for i, (_, b) in enumerate(self.layers)})
        np.savez(Path(path), format=np.array(FORMAT), n_layers=np.array(len(self.layers)),
                 reference=np.asarray(self.reference, np.float64), mean=np.asarray(self.mean, np.float64),
                 use=self.use, **arrays)

    @property
    def n_expression(self) -> int:
        return int(self.layers[-1][0].shape[1])

    def features(self, points_px: np.ndarray) -> np.ndarray:
        """(..., N, 2+) landmarks px -> (..., 2N) float32, the MLP's input."""
        a = aligned_shape(points_px, self.reference) - self.mean
        return (FEATURE_SCALE * a.reshape(a.shape[:-2] + (-1,))).astype(np.float32)

    def predict(self, points_px: np.ndarray) -> np.ndarray:
        """(N, 2+) or (B, N, 2+) landmarks px -> (M,) or (B, M) expression weights in [0, 1]."""
        x = self.features(points_px)
        for i, (W, b) in enumerate(self.layers):
            x = x @ W + b
            if i < len(self.layers) - 1:
                x = gelu_tanh(x)
        return np.clip(x, 0.0, 1.0)

    def merge(self, network: np.ndarray, points_px: np.ndarray) -> np.ndarray:
        """The network's (M,) expression with the shapes in `use` read from the landmarks instead."""
        out = np.array(network, np.float64, copy=True)
        out[self.use] = self.predict(points_px)[self.use]
        return out
