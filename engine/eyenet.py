"""EyeStateNet: eye closure, squint and widening from one grey eye patch (engine.eyestate).

A patch of 24 x 48 px holds the lids, the iris and the corners; three conv blocks and a small
head are enough: both eyes take about 0.15 ms on one core in ONNX Runtime. Trained by
trainers.train_eyes; capture runs the ONNX export (engine.eyestate.EyeClosure), not torch.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from engine.eyestate import PATCH_H, PATCH_W

#: What the net predicts per patch, in order (the model's shapes without the _L/_R side).
OUTPUTS = ("eyeBlink", "eyeSquint", "eyeWide")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class EyeStateNet(nn.Module):
    """(B, 1, PATCH_H, PATCH_W) normalised patches (engine.eyestate.normalise_patches) -> (B, 3) raw
    weights in OUTPUTS order (unclamped; the runtime clamps to [0, 1])."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), hidden: int = 64):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(_block(1, c1), _block(c1, c2), _block(c2, c3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3 * (PATCH_H // 8) * (PATCH_W // 8), hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, len(OUTPUTS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def export_onnx(net: EyeStateNet, path: str | Path) -> None:
    """Write the net (eval mode, BatchNorm folded, dynamic batch) as ONNX to path."""
    was = net.training
    net.eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.zeros(2, 1, PATCH_H, PATCH_W),), buf, dynamo=False, opset_version=17,
                              input_names=["patches"], output_names=["weights"],
                              dynamic_axes={"patches": {0: "batch"}, "weights": {0: "batch"}},
                              do_constant_folding=True)
    finally:
        net.train(was)
    Path(path).write_bytes(buf.getvalue())
