"""FineNet: the detail layer, a displacement map (mm, along the coarse normals) from the face's UV map.

Input (B, 7, R, R) float32, R = config.map_px (256), engine.uvmap's layout (engine.fine_runtime.detail_inputs):
the frame unwrapped by the coarse fit (engine.detail.unwrap, sRGB minus 0.5), the lit texels (0/1), the
shading a smooth albedo leaves unexplained, and how much the shading changes with a slope along u and
along v under the frame's fitted light: the network integrates slopes rather than finding the light.

Output (B, 1, R, R): displacement in mm, config.max_mm · tanh(·), negative into the skin.

A small U-Net in plain torch (no torchvision): a strided stem to R/2, three more strided stages to
R/16, then back up with bilinear upsampling and additive skips to R/2, where one 3x3 convolution gives
each R/2 cell's 2x2 texels (pixel shuffle): the full-resolution detail comes through the stem, which
reads the input at R. A last convolution at R with one output channel took half of the net's time in
ONNX Runtime (its blocked layout pads the channel eightfold) for no gain in accuracy. Depthwise-separable
convolutions past the stem keep it under 2 ms on one core in ONNX Runtime (bench/eval_detail.py).
BatchNorm is folded on export.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.fine_runtime import IN_CHANNELS
from engine.runtime import with_config
from engine.uvmap import DETAIL_MAP_PX

ONNX_OPSET = 17


@dataclass(frozen=True)
class FineNetConfig:
    map_px: int = DETAIL_MAP_PX
    widths: tuple[int, int, int, int] = (16, 24, 32, 48)   # at R/2, R/4, R/8, R/16
    max_mm: float = 2.0

    def __post_init__(self):
        if self.map_px % 16:
            raise ValueError(f"map_px must be a multiple of 16, got {self.map_px}")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 depthwise (stride) -> 1x1 pointwise, each with BatchNorm and ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FineNet(nn.Module):
    def __init__(self, config: FineNetConfig | None = None):
        super().__init__()
        self.config = config or FineNetConfig()
        w = self.config.widths
        self.stem = _conv(IN_CHANNELS, w[0], stride=2)                  # R/2
        self.down = nn.ModuleList([_separable(w[i], w[i + 1], stride=2) for i in range(3)])   # R/4, R/8, R/16
        self.context = _separable(w[3], w[3])
        self.lateral = nn.ModuleList([nn.Conv2d(w[i + 1], w[i], 1) for i in range(3)])
        self.up = nn.ModuleList([_separable(w[i], w[i]) for i in range(3)])
        self.head = nn.Conv2d(w[0], 4, 3, padding=1)        # at R/2: the 2x2 texels of each cell
        nn.init.zeros_(self.head.weight)                    # untrained: no detail
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for layer in self.down:
            skips.append(layer(skips[-1]))
        y = self.context(skips[-1])
        for i in (2, 1, 0):
            y = F.interpolate(self.lateral[i](y), scale_factor=2.0, mode="bilinear", align_corners=False)
            y = self.up[i](y + skips[i])
        return self.config.max_mm * torch.tanh(F.pixel_shuffle(self.head(y), 2))

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_weights(net: FineNet, path: str | Path) -> None:
    torch.save({"config": asdict(net.config), "state_dict": net.state_dict()}, path)


def load_weights(path: str | Path) -> FineNet:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = dict(blob["config"])
    cfg["widths"] = tuple(cfg["widths"])
    net = FineNet(FineNetConfig(**cfg))
    net.load_state_dict(blob["state_dict"])
    return net.eval()


def export_onnx(net: FineNet, path: str | Path | None = None) -> bytes:
    """The net (eval mode, BatchNorm folded, dynamic batch) as ONNX bytes, its config in the metadata
    ('finenet_config'); also written to path if given."""
    R = net.config.map_px
    was = net.training
    buf = io.BytesIO()
    try:
        net.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.zeros(1, IN_CHANNELS, R, R),), buf, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["maps"], output_names=["displacement_mm"],
                              dynamic_axes={"maps": {0: "batch"}, "displacement_mm": {0: "batch"}},
                              do_constant_folding=True)
    finally:
        net.train(was)
    return with_config(buf.getvalue(), "finenet_config", net.config, path)

