"""engine.runtime: ONNX export, ONNX Runtime against torch within AGREEMENT_TOLERANCE on
randomised nets, dynamic batch, the runtime interface's inputs and outputs, graph cleanliness."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from engine.coarsenet import CoarseNet, CoarseNetConfig, decode, normalise_landmarks, preprocess
from engine.coarsenet import CoarseNetInference
from engine.runtime import (AGREEMENT_TOLERANCE, OUTPUT_NAMES, OnnxRuntime, TorchRuntime,
                            export_onnx)

S = 128

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: ONNX runtime tests skipped")
onnx = pytest.importorskip("onnx", reason="onnx is not installed: ONNX export tests skipped")


def crops_and_cameras(n: int, seed: int):
    """n random crops, crop cameras and tracked landmarks (crop px)."""
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    K = np.tile(np.array([[300.0, 0, 60], [0, 310.0, 70], [0, 0, 1]], np.float32), (n, 1, 1))
    K[:, 0, 0] += 25 * np.arange(n)
    K[:, :2, 2] += rng.uniform(-20, 20, (n, 2))
    landmarks = rng.uniform(10, S - 10, (n, 478, 2)).astype(np.float32)
    return crops, K, landmarks


@pytest.fixture(scope="module", params=[0, 1], ids=["net0", "net1"])
def nets(request, randomised_net):
    net = randomised_net(request.param)
    return net, TorchRuntime(net), OnnxRuntime(export_onnx(net))


def assert_agree(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype == np.float32, key
        if key == "translation":
            err = (np.linalg.norm(a[key] - b[key], axis=1) / np.linalg.norm(b[key], axis=1)).max()
        else:
            err = np.abs(a[key] - b[key]).max()
        assert err <= AGREEMENT_TOLERANCE[key], f"{key}: {err:.2e} > {AGREEMENT_TOLERANCE[key]:.0e}"


def test_onnx_runtime_agrees_with_torch(nets):
    net, torch_rt, onnx_rt = nets
    crops, K, lm = crops_and_cameras(6, seed=10)
    a, b = torch_rt.run(crops, K, lm), onnx_rt.run(crops, K, lm)
    assert set(a) == set(OUTPUT_NAMES)
    # the outputs really vary with the input, so agreement is not agreement on a constant
    assert a["identity"].std(axis=0).mean() > 0.3 and a["rotation"].std(axis=0).mean() > 0.05
    assert_agree(a, b)


def test_torch_runtime_is_the_model(nets):
    net, torch_rt, _ = nets
    crops, K, lm = crops_and_cameras(3, seed=11)
    out = torch_rt.run(crops, K, lm)
    with torch.no_grad():
        ref = decode(net(preprocess(torch.from_numpy(crops)), normalise_landmarks(torch.from_numpy(lm), S)),
                     torch.from_numpy(K), net.config)
    for key in OUTPUT_NAMES:
        assert np.array_equal(out[key], ref[key].numpy()), key


def test_dynamic_batch_matches_single_crops(nets):
    _, _, onnx_rt = nets
    crops, K, lm = crops_and_cameras(4, seed=12)
    batch = onnx_rt.run(crops, K, lm)
    for i in (0, 3):
        one = onnx_rt.run(crops[i:i + 1], K[i:i + 1], lm[i:i + 1])
        for key in OUTPUT_NAMES:
            assert np.allclose(one[key][0], batch[key][i], atol=1e-5, rtol=1e-5), key


def test_without_camera_there_is_no_translation(nets):
    _, torch_rt, onnx_rt = nets
    crops, K, lm = crops_and_cameras(2, seed=13)
    for rt in (torch_rt, onnx_rt):
        out = rt.run(crops, landmarks=lm)
        assert "translation" not in out and set(out) == set(OUTPUT_NAMES) - {"translation"}
        full = rt.run(crops, K[0], lm)  # one (3, 3) camera for the batch
        assert np.array_equal(out["crop_xy"], full["crop_xy"])


def test_bad_inputs_are_refused(nets):
    _, torch_rt, onnx_rt = nets
    for rt in (torch_rt, onnx_rt):
        with pytest.raises(ValueError, match="uint8"):
            rt.run(np.zeros((1, S, S, 3), np.float32))
        with pytest.raises(ValueError, match="uint8"):
            rt.run(np.zeros((S, S, 3), np.uint8))
        with pytest.raises(ValueError, match="K_crop"):
            rt.run(np.zeros((2, S, S, 3), np.uint8), np.eye(3, dtype=np.float32)[None].repeat(3, 0))
        with pytest.raises(ValueError, match="tracked landmarks"):
            rt.run(np.zeros((2, S, S, 3), np.uint8), np.eye(3, dtype=np.float32))
        with pytest.raises(ValueError, match="landmarks must be"):
            rt.run(np.zeros((2, S, S, 3), np.uint8), np.eye(3, dtype=np.float32), np.zeros((2, 68, 2)))


def test_export_file_threads_and_spinning_agree(tmp_path, randomised_net):
    net = randomised_net(2)
    path = tmp_path / "coarsenet.onnx"
    data = export_onnx(net, path)
    assert path.read_bytes() == data
    crops, K, lm = crops_and_cameras(2, seed=14)
    ref = OnnxRuntime(path).run(crops, K, lm)
    two = OnnxRuntime(path, intra_op_threads=2, spinning=True)
    assert two.config == json.loads(json.dumps(asdict(net.config)))
    assert_agree(two.run(crops, K, lm), ref)
    assert_agree(OnnxRuntime(data, optimization="none").run(crops, K, lm), ref)


def test_graph_is_plain_onnx():
    """Standard-domain operators only (no ATen fallbacks), BatchNorm folded, config in the metadata."""
    proto = onnx.load_from_string(export_onnx(CoarseNet(CoarseNetConfig(width=0.35))))
    ops = {n.op_type for n in proto.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert "BatchNormalization" not in ops and "ATen" not in ops
    assert {"Conv", "Gemm", "Sigmoid"} <= ops
    assert [i.name for i in proto.graph.input] == ["crops", "K_crop", "landmarks"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # a crop-only net has no landmark input, and its runtime asks for none
    crop_only = CoarseNet(CoarseNetConfig(width=0.35, n_landmarks=0))
    assert [i.name for i in onnx.load_from_string(export_onnx(crop_only)).graph.input] == ["crops", "K_crop"]
    crops, K, _ = crops_and_cameras(1, seed=15)
    assert OnnxRuntime.from_model(crop_only).run(crops, K)["expression"].shape == (1, 53)
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["coarsenet_config"])["width"] == 0.35


def test_export_leaves_training_mode_alone():
    net = CoarseNet().train()
    export_onnx(net)
    assert net.training
    assert isinstance(CoarseNetInference(net, OUTPUT_NAMES).net, CoarseNet)
