"""engine.fine_runtime and --detail: FineNet in ONNX Runtime on a frame, the detailed mesh, the take's files."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pygltflib
import pytest
import torch

from capture import cli
from capture.sinks import decode_displacement, encode_displacement, load_track, read_obj
from engine.fine_runtime import FineNetError, FineRuntime
from engine.finenet import FineNet, FineNetConfig, export_onnx
from engine.pose import default_camera_matrix, model_to_camera

SHARED = Path(__file__).resolve().parents[2] / "shared"
D12 = SHARED / "data" / "videos" / "d12.mp4"


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> Path:
    """A FineNet at 64 texels with random weights (its head too), as ONNX: real computation, no training."""
    net = FineNet(FineNetConfig(map_px=64, max_mm=1.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("finenet") / "finenet.onnx"
    export_onnx(net, path)
    return path


def test_runtime_displaces_the_face_skin_only(model, small_weights):
    rt = FineRuntime(model, small_weights)
    K = default_camera_matrix(320, 240)
    cam = model.neutral @ model_to_camera(0.2, 0.0, 0.0).T + np.array([0.0, 0.0, 50.0])
    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    d, geometry = rt.displacement(image, cam, K)
    assert d.shape == (64, 64) and np.abs(d).max() <= 1.0 and np.abs(d).max() > 0.01
    assert (d[~rt.face_uv.mask] == 0).all()
    verts = rt.mesh_vertices(cam, d)
    n_mid = rt.detail_mesh.n_vertices - 9409
    assert verts.shape == (model.n_vertices + n_mid, 3)
    assert rt.triangles.max() == len(verts) - 1 and rt.triangles.min() >= 0
    # everything but the face skin is where the coarse mesh has it; the skin moved by at most max_mm
    assert np.array_equal(verts[9409:model.n_vertices], cam[9409:].astype(np.float32))
    moved = np.linalg.norm(verts[:9409] - cam[:9409], axis=1)
    assert moved.max() <= 0.1 + 1e-5 and moved.max() > 0.001
    normals = rt.normal_map(geometry, d)
    assert np.allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)
    assert (normals[~rt.face_uv.mask] == (0, 0, 1)).all()


def test_missing_or_bad_weights(model, tmp_path):
    with pytest.raises(FineNetError, match="not found"):
        FineRuntime(model, tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(FineNetError, match="not a FineNet"):
        FineRuntime(model, bad)


def test_displacement_png_round_trip():
    d = np.linspace(-1.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    back = decode_displacement(encode_displacement(d, 2.0), 2.0)
    assert np.abs(back - d).max() < 2.0 / 32767


def test_video_with_detail_writes_maps_and_detailed_meshes(tmp_path, capsys, small_weights, model):
    out = tmp_path / "take"
    code = cli.main(["video", str(D12), "--out", str(out), "--max-frames", "3", "--detail",
                     "--detail-weights", str(small_weights), "--quiet"])
    assert code == 0, capsys.readouterr().err
    track = load_track(out / "track.npz")
    assert track["detail_scale_mm"] == 1.0
    frames = [int(i) for i, f in zip(track["frame_index"], track["face_found"]) if f]
    assert frames
    rt = FineRuntime(model, small_weights)
    for i in frames:
        code16 = cv2.imread(str(out / "detail" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert code16.dtype == np.uint16 and code16.shape == (64, 64)
        d = decode_displacement(code16, 1.0)
        assert np.abs(d).max() > 0.01 and (d[~rt.face_uv.mask] == 0).all()
        normal = cv2.imread(str(out / "detail_normals" / f"{i:06d}.png"))
        assert normal.shape == (64, 64, 3)
        verts, tris = read_obj(out / "meshes" / f"{i:06d}.obj")
        assert len(verts) == model.n_vertices + rt.detail_mesh.n_vertices - 9409
        assert np.array_equal(tris, rt.triangles)
    # the take's detail goes into its glTF as the face's normal texture
    code = cli.main(["export", str(out), "--detail", "--quiet"])
    assert code == 0, capsys.readouterr().err
    doc = pygltflib.GLTF2().load(str(out / "take.glb"))
    assert [p.material for p in doc.meshes[0].primitives] == [0, 1] and len(doc.images) == 1
    assert doc.materials[0].normalTexture.index == 0


def test_export_detail_of_a_take_without_it_is_one_line(tmp_path, capsys, model):
    from capture.sinks import TrackWriter
    with TrackWriter(tmp_path / "track.npz", np.eye(3), (64, 64), fps=25.0) as writer:
        writer.add(0, 0.0, True, blendshapes=np.zeros(52), expression=np.zeros(model.n_expression),
                   rotation=np.eye(3), translation=np.array([0.0, 0.0, 50.0]))
    for argv, words in ((["--detail"], "the take has no detail maps (record it with --detail)"),
                        (["--detail-frame", "0"], "--detail-frame needs --detail")):
        code = cli.main(["export", str(tmp_path), "--quiet", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and words in err[0], err
        assert not (tmp_path / "take.glb").exists()


def test_detail_without_weights_is_one_line(tmp_path, capsys):
    code = cli.main(["video", str(D12), "--out", str(tmp_path / "t"), "--max-frames", "1", "--detail",
                     "--detail-weights", str(tmp_path / "none.onnx"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("capture: error: FineNet weights not found")


def test_inputs_say_how_slopes_shade():
    """A flat patch facing the camera, lit from the side, with ripples along u finer than the albedo blur:
    the input's shading residual is the response to a slope along u times the ripples' slope, and the
    response along v is about nil."""
    from engine.detail import displaced_normals
    from engine.fine_runtime import detail_inputs
    from engine.lighting import linear_to_srgb, sh_basis_np
    from trainers.synthesis import directional_sh

    R = 128                                                                 # albedo blur: 2.5 texels
    geometry = {"normals": np.tile([0.0, 0.0, -1.0], (R, R, 1)), "Pu": np.tile([10.0, 0.0, 0.0], (R, R, 1)),
                "Pv": np.tile([0.0, -10.0, 0.0], (R, R, 1))}                 # 10 cm across, v up = camera -y
    sh = directional_sh(np.array([0.6, 0.0, -0.8]), np.ones(3)) + directional_sh(np.array([0, 0, -1.0]), 0.2 * np.ones(3))
    cols = np.arange(R)
    d_mm = np.tile(0.3 * np.sin(2 * np.pi * cols / 6.0), (R, 1))         # finer than the albedo blur
    n = displaced_normals(geometry["normals"], geometry["Pu"], geometry["Pv"], d_mm / 10.0)
    colour = linear_to_srgb(0.5 * (sh_basis_np(n.astype(np.float64)) @ sh))
    x = detail_inputs(colour, np.ones((R, R), bool), geometry, sh.astype(np.float32))
    assert x.shape == (7, R, R)
    slope = np.gradient(d_mm, axis=1)                                       # mm per texel
    inner = (slice(16, -16), slice(16, -16))
    predicted = (x[5] * slope)[inner]
    residual = x[4][inner]
    assert np.corrcoef(predicted.ravel(), residual.ravel())[0, 1] > 0.95
    assert 0.85 < np.std(residual) / np.std(predicted) < 1.15
    assert np.abs(x[6][inner]).max() < 0.1 * np.abs(x[5][inner]).max()
