"""One-Euro filtering (Casiez et al. 2012) of per-frame values.

At rest the cutoff is low, removing jitter; when a value moves fast the cutoff
rises with its speed, so blinks and mouth motion pass with little lag.
"""
from __future__ import annotations

import numpy as np


def smoothing_factor(dt_s: float, cutoff_hz: np.ndarray | float) -> np.ndarray | float:
    """Exponential smoothing factor of a first-order low-pass at cutoff_hz for step dt_s."""
    tau = 1.0 / (2.0 * np.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt_s)


class OneEuroFilter:
    """Filters a fixed-size vector of values.

    min_cutoff_hz: cutoff at rest (lower: steadier, more lag at rest);
    beta: how fast the cutoff rises with speed (per unit of the value per second);
    d_cutoff_hz: cutoff of the speed estimate.
    """

    def __init__(self, min_cutoff_hz: float | np.ndarray = 1.0, beta: float | np.ndarray = 0.0,
                 d_cutoff_hz: float = 1.0):
        self.min_cutoff_hz = min_cutoff_hz
        self.beta = beta
        self.d_cutoff_hz = d_cutoff_hz
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t_s: float | None = None

    def reset(self) -> None:
        """Forget the past, e.g. when the face was lost."""
        self._x = self._dx = self._t_s = None

    def __call__(self, x: np.ndarray, t_s: float) -> np.ndarray:
        """Filtered value of x observed at time t_s (seconds)."""
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or t_s <= self._t_s:
            self._x, self._dx, self._t_s = x.copy(), np.zeros_like(x), t_s
            return x.copy()
        dt = t_s - self._t_s
        dx = (x - self._x) / dt
        a_d = smoothing_factor(dt, self.d_cutoff_hz)
        self._dx = self._dx + a_d * (dx - self._dx)
        cutoff = self.min_cutoff_hz + np.asarray(self.beta) * np.abs(self._dx)
        a = smoothing_factor(dt, cutoff)
        self._x = self._x + a * (x - self._x)
        self._t_s = t_s
        return self._x.copy()
