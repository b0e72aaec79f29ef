"""trainers.wrinkles: procedural detail maps with exact truth."""
from __future__ import annotations

import numpy as np

from engine.detail import texel_geometry
from engine.uvmap import FaceUV
from trainers.wrinkles import random_wrinkles


def test_wrinkles_are_grooves_on_the_front_of_the_face(model):
    face_uv = FaceUV.from_model(model, 128)
    rest = texel_geometry(face_uv, model.neutral)
    maps = [random_wrinkles(np.random.default_rng(s), model, face_uv, rest) for s in range(6)]
    for d in maps:
        assert d.shape == (128, 128) and d.dtype == np.float32
        assert d.max() == 0.0 and d.min() >= -3.0                   # grooves, a few tenths of a mm to 1 mm each
        assert (d[~face_uv.mask] == 0).all()
        assert (d[face_uv.mask & (rest["normals"][..., 2] <= 0.35)] == 0).all()   # not on the ears or under the jaw
    assert sum((d < -0.1).any() for d in maps) >= 5
    assert np.array_equal(maps[0], random_wrinkles(np.random.default_rng(0), model, face_uv, rest))
    assert not np.array_equal(maps[0], maps[1])
