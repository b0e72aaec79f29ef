"""FineNet at run time, in ONNX Runtime (no torch): from a frame and its coarse fit to the detail.

The network itself, its training export and its weights' format are engine.finenet's; this module
holds what a capture needs: the frame's light and the input layout (frame_light, detail_inputs; the
training reads its inputs through them too) and FineRuntime, which unwraps the frame into the face's
map, runs the network and places the displacement on the mesh.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from engine.detail import (detailed_face_triangles, detailed_vertices, displaced_vertices, ramp_normals,
                           tangent_normal_map, texel_geometry, unwrap)
from engine.lighting import fit_sh_lighting, sh_basis_np, srgb_to_linear
from engine.runtime import onnx_session
from engine.trt_engine import TensorRTError
from engine.uvmap import DetailMesh, FaceUV

#: Input channels: colour (3), lit (1), shading residual (1), shading response to slope along u and v (2).
IN_CHANNELS = 7
#: The albedo model's blur, texels of a 256 map (scaled with the map): a smooth albedo is what the frame,
#: divided by its shading, looks like blurred this much (about 6 mm); the detail explains the rest.
ALBEDO_SIGMA_TEXELS = 5.0
#: Texels the frame's light is fitted to, at most (an even subsample).
LIGHT_SAMPLES = 6000
#: Slope (mm of displacement per texel) of the finite difference that measures the shading's response.
SLOPE_STEP_MM = 0.01


def frame_light(colour_linear: np.ndarray, visible: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(9, 3) float32 SH light fitted to the visible texels' colour (R, R, 3) linear and coarse normals
    (engine.lighting.fit_sh_lighting); zeros when fewer than 50 texels are visible."""
    ids = np.flatnonzero(visible)
    if len(ids) < 50:
        return np.zeros((9, 3), np.float32)
    pick = ids[np.linspace(0, len(ids) - 1, min(len(ids), LIGHT_SAMPLES)).astype(int)]
    return fit_sh_lighting(normals.reshape(-1, 3)[pick], colour_linear.reshape(-1, 3)[pick]).astype(np.float32)


def masked_blur(values: np.ndarray, mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of values (R, R, C) over the mask (R, R) only (normalised by the blurred mask)."""
    w = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma_px)
    v = cv2.GaussianBlur(np.ascontiguousarray(values * mask[..., None], np.float32), (0, 0), sigma_px)
    return (v.reshape(values.shape) / np.maximum(w, 1e-3)[..., None]).astype(np.float32)


def _rgb_mean(x: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...): the channel mean, written out (numpy's reduction over a last axis of 3 is slow)."""
    return (x[..., 0] + x[..., 1] + x[..., 2]) / 3.0


def detail_inputs(colour_srgb: np.ndarray, visible: np.ndarray, geometry: dict, sh: np.ndarray) -> np.ndarray:
    """(7, R, R) float32 network input; zeros where the face is not seen or not lit.

    colour_srgb (R, R, 3) in [0, 1] (engine.detail.unwrap / 255), visible (R, R), geometry of
    engine.detail.texel_geometry, sh (9, 3) the frame's light (frame_light). Channels: the colour
    minus 0.5; lit (0/1); the shading residual, the mean over channels of ρ / blur(ρ) - 1 with
    ρ = colour / coarse shading (what a smooth albedo leaves unexplained, trainers.detail_loss's
    residual at zero detail); and the relative change of the shading per mm-per-texel of slope along u
    and along v (engine.detail.displaced_normals' tilt under this light): with them, the residual is
    about response · slope, so the net's job is to integrate, not to find the light.
    """
    R = visible.shape[0]
    n = geometry["normals"]
    shading = sh_basis_np(n.astype(np.float64)) @ sh
    lit = visible & (np.minimum(np.minimum(shading[..., 0], shading[..., 1]), shading[..., 2]) > 1e-3)
    safe = np.where(lit[..., None], shading, 1.0)
    rho = np.where(lit[..., None], srgb_to_linear(colour_srgb) / safe, 0.0)
    smooth = masked_blur(rho, lit, ALBEDO_SIGMA_TEXELS * R / 256)
    residual = np.where(lit, _rgb_mean(rho / np.maximum(smooth, 1e-4)) - 1.0, 0.0).clip(-1.0, 1.0)
    responses = []
    # the surface rising SLOPE_STEP_MM per texel along u (columns), then along v (rows, upwards)
    for tilted in ramp_normals(n, geometry["Pu"], geometry["Pv"], SLOPE_STEP_MM / 10.0 * R):
        change = (sh_basis_np(tilted.astype(np.float64)) @ sh) / safe - 1.0
        responses.append(np.where(lit, _rgb_mean(change) / SLOPE_STEP_MM, 0.0))
    litf = lit.astype(np.float32)
    x = np.concatenate([(colour_srgb - 0.5) * litf[..., None], litf[..., None], residual[..., None],
                        np.stack(responses, axis=-1) * litf[..., None]], axis=-1)
    return np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)


#: The shipped weights (trainers/train_fine.py; `make weights`).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "finenet.onnx"


class FineNetError(RuntimeError):
    """FineNet's weights are missing or unusable."""


class FineRuntime:
    """FineNet in ONNX Runtime with the face's layout: from a frame and its coarse fit to the detail.

    displacement(image, vertices_cam, K) -> the (R, R) map, mm; mesh_vertices places it
    on the coarse mesh; normal_map gives a renderer's tangent-space normal texture. provider: where
    the net runs (engine.runtime.onnx_session: "cpu", "cuda", "tensorrt"; the unwrapping and the rest
    stay numpy).
    """

    def __init__(self, model, weights: str | Path | None = None, intra_op_threads: int = 1, provider: str = "cpu"):
        path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise FineNetError(f"FineNet weights not found at {path} (train them: make weights)")
        try:
            self.session = onnx_session(path, intra_op_threads, provider=provider)
            meta = self.session.get_modelmeta().custom_metadata_map
            cfg = json.loads(meta["finenet_config"])
        except TensorRTError as exc:
            raise FineNetError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
            raise FineNetError(f"{path} is not a FineNet ONNX file: {exc}") from exc
        self.map_px, self.max_mm = int(cfg["map_px"]), float(cfg["max_mm"])
        self.model = model
        self.face_uv = FaceUV.from_model(model, self.map_px)
        self.detail_mesh = DetailMesh.from_face_uv(self.face_uv)
        self.triangles = detailed_face_triangles(model.triangles, model.material_mask("M_Face"), self.detail_mesh,
                                                 model.n_vertices)

    def displacement(self, image_rgb: np.ndarray, vertices_cam: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, dict]:
        """(map (R, R) float32 mm, geometry of engine.detail.texel_geometry) for a frame (H, W, 3) uint8
        and its coarse fit vertices_cam (V, 3) cm under K."""
        g = texel_geometry(self.face_uv, vertices_cam)
        colour, visible = unwrap(image_rgb, vertices_cam, g, self.face_uv, K)
        colour /= 255.0
        sh = frame_light(srgb_to_linear(colour), visible, g["normals"])
        x = detail_inputs(colour, visible, g, sh)[None]
        d = self.session.run(None, {"maps": x})[0][0, 0]
        d[~self.face_uv.mask] = 0.0
        return d.astype(np.float32), g

    def mesh_vertices(self, vertices_cam: np.ndarray, displacement_mm: np.ndarray) -> np.ndarray:
        """The whole head with the detail, in the vertex order of self.triangles (engine.detail.detailed_vertices)."""
        detail = displaced_vertices(self.detail_mesh, vertices_cam, self.face_uv.triangles, displacement_mm)
        return detailed_vertices(vertices_cam, detail, self.detail_mesh)

    def normal_map(self, geometry: dict, displacement_mm: np.ndarray) -> np.ndarray:
        return tangent_normal_map(geometry["Pu"], geometry["Pv"], displacement_mm, self.face_uv.mask)
