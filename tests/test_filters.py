"""engine.filters: the One-Euro filter at the pipeline's settings."""
from __future__ import annotations


import numpy as np
import pytest


from engine.filters import OneEuroFilter, smoothing_factor

FPS = 30.0
# the pipeline's expression filter defaults (capture.pipeline.CaptureSettings)
CUTOFF_HZ, BETA = 1.5, 2.0


def _run(f: OneEuroFilter, xs: np.ndarray, fps: float = FPS) -> np.ndarray:
    return np.array([f(x, i / fps) for i, x in enumerate(xs)])


def test_smoothing_factor_is_a_first_order_low_pass():
    dt = 1.0 / FPS
    tau = 1.0 / (2.0 * np.pi * CUTOFF_HZ)
    assert smoothing_factor(dt, CUTOFF_HZ) == pytest.approx(dt / (dt + tau))
    assert 0.0 < smoothing_factor(dt, 0.1) < smoothing_factor(dt, 1.0) < smoothing_factor(dt, 100.0) < 1.0
    np.testing.assert_allclose(smoothing_factor(dt, np.array([1.0, 2.0])),
                               [smoothing_factor(dt, 1.0), smoothing_factor(dt, 2.0)])


def test_constant_input_passes_unchanged():
    f = OneEuroFilter(CUTOFF_HZ, BETA)
    x = np.array([0.0, 0.25, 1.0, 0.7])
    for i in range(60):
        np.testing.assert_allclose(f(x, i / FPS), x, atol=1e-15)


def test_first_value_passes_unchanged_and_output_is_a_copy():
    f = OneEuroFilter(CUTOFF_HZ, BETA)
    x = np.array([0.4, 0.6])
    y = f(x, 0.0)
    np.testing.assert_array_equal(y, x)
    y[0] = 99.0
    np.testing.assert_allclose(f(x, 1 / FPS), x)  # mutating an output does not reach the state


def test_noise_at_rest_is_reduced():
    rng = np.random.default_rng(0)
    noise_std = 0.02
    x = 0.3 + rng.normal(0.0, noise_std, (300, 52))
    y = _run(OneEuroFilter(CUTOFF_HZ, BETA), x)
    steady = slice(30, None)
    out_std = y[steady].std(axis=0).mean()
    in_std = x[steady].std(axis=0).mean()
    assert out_std < 0.5 * in_std, (out_std, in_std)
    # and it does not drift: the mean stays at the resting value
    assert abs(y[steady].mean() - 0.3) < 0.005


def test_fast_step_passes_with_little_lag():
    """A blink: 0 -> 1 from one frame to the next reaches 0.8 within three frames."""
    x = np.r_[np.zeros(30), np.ones(15)][:, None]
    y = _run(OneEuroFilter(CUTOFF_HZ, BETA), x)[:, 0]
    assert np.all(y[:30] == 0.0)
    assert y[30] > 0.0
    assert y[32] > 0.8, y[30:34]
    assert np.all(np.diff(y[29:]) >= 0) and y[-1] <= 1.0   # no overshoot, monotone rise
    # without beta the same step lags much more: it is the speed term that lets blinks through
    y0 = _run(OneEuroFilter(CUTOFF_HZ, 0.0), x)[:, 0]
    assert y0[32] < 0.6


def test_elements_are_filtered_independently_with_per_element_settings():
    rng = np.random.default_rng(1)
    x = np.cumsum(rng.normal(0, 0.05, (60, 2)), axis=0)
    cut, beta = np.array([1.0, 3.0]), np.array([0.5, 2.0])
    joint = _run(OneEuroFilter(cut, beta), x)
    for k in range(2):
        alone = _run(OneEuroFilter(cut[k], beta[k]), x[:, k:k + 1])[:, 0]
        np.testing.assert_allclose(joint[:, k], alone, atol=1e-12)


def test_reset_forgets():
    f = OneEuroFilter(CUTOFF_HZ, BETA)
    _run(f, np.zeros((20, 3)))
    jump = np.array([1.0, 0.5, 0.2])
    assert np.all(f(jump, 20 / FPS) < jump)       # smoothed towards the past
    f.reset()
    np.testing.assert_array_equal(f(jump, 21 / FPS), jump)   # no past: passes unchanged
    np.testing.assert_allclose(f(jump, 22 / FPS), jump)     # and the speed estimate restarted at 0


def test_time_going_backwards_restarts_instead_of_dividing_by_zero():
    f = OneEuroFilter(CUTOFF_HZ, BETA)
    _run(f, np.zeros((10, 2)))
    x = np.array([0.8, 0.1])
    for t in (9 / FPS, 0.0):   # the same time again, then a seek back
        y = f(x, t)
        assert np.all(np.isfinite(y))
        np.testing.assert_array_equal(y, x)
