"""trainers.fine_data: synthetic faces with known detail, and a frame's FineNet maps."""
from __future__ import annotations

import numpy as np

from engine.correspondence import LandmarkCorrespondence
from engine.uvmap import DetailMesh, FaceUV
from trainers.fine_data import frame_maps, synthetic_detail_frame
from trainers.synthesis import SynthesisAssets, srgb_to_linear


def test_synthetic_frame_and_its_maps(model):
    face_uv = FaceUV.from_model(model, 128)
    assets = SynthesisAssets.build(model, LandmarkCorrespondence.load())
    frame = synthetic_detail_frame(np.random.default_rng(3), assets, face_uv, DetailMesh.from_face_uv(face_uv),
                                   size=(320, 240))
    assert frame["image"].shape == (240, 320, 3) and frame["image"].dtype == np.uint8
    assert frame["displacement_mm"].shape == (128, 128) and frame["displacement_mm"].min() < -0.1
    maps = frame_maps(frame["image"], frame["vertices_cam"], frame["K"], face_uv)
    vis = maps["visible"]
    assert 0.15 < vis.mean() < 0.8
    # the unwrapped colour is the frame's own, decoded to linear
    assert np.all(maps["colour"][vis] >= 0) and np.all(maps["colour"][vis] <= 1)
    assert abs(np.median(maps["colour"][vis]) - np.median(srgb_to_linear(frame["image"] / 255.0))) < 0.3
    # the light is a light: positive over the visible texels
    assert maps["sh"][0].min() > 0
