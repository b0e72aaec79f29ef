"""engine.finenet: shapes, the untrained net's flat map, ONNX Runtime agreeing with torch, weights round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.fine_runtime import IN_CHANNELS
from engine.finenet import FineNet, FineNetConfig, export_onnx, load_weights, save_weights
from engine.runtime import onnx_session


def _trained_looking(net: FineNet) -> FineNet:
    """Random weights everywhere (the head starts at zero) and BatchNorm statistics that are not 0/1."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return net.eval()


def test_untrained_net_predicts_no_detail():
    net = FineNet(FineNetConfig(map_px=64)).eval()
    out = net(torch.randn(2, IN_CHANNELS, 64, 64))
    assert out.shape == (2, 1, 64, 64) and out.abs().max().item() == 0.0


def test_output_is_bounded_and_onnx_agrees(tmp_path):
    net = _trained_looking(FineNet(FineNetConfig(map_px=64, max_mm=1.5)))
    x = torch.randn(3, IN_CHANNELS, 64, 64)
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(ref).max() <= 1.5 and ref.std() > 0.01
    session = onnx_session(export_onnx(net, tmp_path / "f.onnx"))
    out = session.run(None, {"maps": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4
    save_weights(net, tmp_path / "f.pt")
    again = load_weights(tmp_path / "f.pt")
    with torch.no_grad():
        assert torch.equal(again(x), torch.as_tensor(ref))


def test_map_size_must_divide_by_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        FineNetConfig(map_px=100)
