"""CoarseNet: one CNN pass from a 128 px face crop to the face model's parameters (seed 002).

The network regresses χ = {identity, expression, head pose, SH lighting, albedo}
from a crop taken around the tracked landmarks, so the optimiser's job (engine.fitting)
is done in one forward pass. Plain torch only (no torchvision), small enough for
about a millisecond on one CPU core in ONNX Runtime (bench/bench_coarsenet.py).

Input: (B, 3, S, S) float32 RGB, S = config.input_size (128), normalised as
``rgb_uint8 / 127.5 - 1`` (so in [-1, 1]); `preprocess` does it from (B, S, S, 3) uint8.
And, with config.n_landmarks = 478 (the default), the tracker's landmarks in the crop,
(B, 478, 2) normalised like crop_xy (`normalise_landmarks`): trained from scratch on
two CPU cores, the crop alone learns pose and expression far more slowly.

Backbone: MobileNetV2-style inverted residual blocks (1x1 expand, 3x3 depthwise,
1x1 linear projection, residual when the shape allows), ReLU, BatchNorm (folded
into the convolutions on ONNX export), global average pooling. The landmarks go
through an MLP (config.landmark_hidden) and, unchanged, straight to the head
(landmark_skip). One linear head reads all three (`CoarseNet.embed`).
Default: 1.46 M weights (0.66 M in the backbone), 28.7 M MACs per crop.

Parameter vector layout (P = 152 with the defaults; `param_layout` gives the slices):

=============  =====  ============================================================
name           size   decoded as
=============  =====  ============================================================
identity       60     as is: face-model identity weights, units of the prior's std
                      (the model's weights ~ N(0, 1)), (B, 60)
expression     53     as is, clamped to [0, 1]: the model's expression weights, (B, 53); training
                      reads the unclamped `expression_linear` (a sigmoid here saturates: most
                      targets are exactly 0, the logits run off to -inf and the gradient dies —
                      nets with a sigmoid never learned a single expression)
rot6d          6      two 3-vectors a1, a2 -> Gram-Schmidt -> R = [b1 b2 b1×b2]
                      (columns), model -> crop camera, (B, 3, 3)
crop_xy        2      where the model-space anchor point projects in the crop,
                      crop-normalised: u = (S-1)/2 + x·S/2, v = (S-1)/2 + y·S/2 px
log_scale      1      s = (S / scale_ref_cm) · exp(log_scale): crop px per cm at
                      the anchor's depth; depth z = f_crop / s
sh             27     as is, reshaped (B, 9, 3): irradiance SH coefficients in the
                      order and frame of engine.shading (camera space)
albedo         3      sigmoid -> [0, 1]: one RGB skin tone, (B, 3)
=============  =====  ============================================================

Translation (`translation_from_crop`): the anchor (the centroid of the model's 68
landmark vertices, config.anchor_cm, about 9.4 cm in front of the model origin)
sits at depth z = f / s on the ray through crop pixel (u, v):
X_anchor = z · K_crop⁻¹ [u, v, 1] (normalised to unit z), and t = X_anchor − R · anchor,
with f = sqrt|det K_crop[:2, :2]| the crop camera's focal length in px. The network
thus predicts only what the crop shows (where the face is in it, how big it is);
the crop camera turns that into centimetres. `crop_params_from_translation` is the
exact inverse, for training targets.

The head's bias starts at `prior_params`: a frontal, neutral (expression 0.05),
centred face of the model's mean identity in ambient light, so an untrained net
decodes to something sensible.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

#: (expansion, output channels, repeats, first stride) per stage, MobileNetV2's table
#: minus its last 320-channel stage (at 4 x 4 px it costs time and adds little).
MOBILENET_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
)

#: Y00 of engine.shading's SH basis (0.5 / sqrt(pi)); L0 = 1 / Y00 is irradiance 1 everywhere.
_SH_Y00 = 0.5 * math.sqrt(1.0 / math.pi)

WEIGHTS_FORMAT = "capture.coarsenet/1"


@dataclass(frozen=True)
class CoarseNetConfig:
    """Architecture and output layout. Channel counts are scaled by `width`, rounded to 8."""

    input_size: int = 128                 # crop side S, px
    width: float = 0.5                    # channel multiplier; 0.5: ~0.8 ms on one core (ORT), see notes
    stem_channels: int = 32               # first 3x3 stride-2 conv, before `width`
    stages: tuple[tuple[int, int, int, int], ...] = MOBILENET_STAGES
    last_channels: int = 1280             # the 1x1 conv before pooling (not scaled by width, as MobileNetV2)
    n_identity: int = 60                  # identity weights regressed (the model has 100)
    n_expression: int = 53                # the model's expression shapes (ARKit-named)
    n_albedo: int = 3                     # one RGB skin tone
    anchor_cm: tuple[float, float, float] = (0.0, -0.26, 9.44)  # 68-landmark centroid, model space
    scale_ref_cm: float = 20.0            # a span of this many cm fills the crop at log_scale 0
    expression_prior: float = 0.05        # decoded expression weight of the untrained head
    albedo_prior: float = 0.5             # decoded albedo (every channel) of the untrained head
    n_landmarks: int = 478                # tracked landmarks the net also reads (0: crop only)
    landmark_hidden: tuple[int, ...] = (512, 256)  # the landmark branch's MLP widths
    landmark_skip: bool = True            # the head also reads the landmarks themselves (a linear path:
                                          # learned in a few hundred steps, where the MLP takes thousands)

    def __post_init__(self):
        # lists (from a saved dict) back to tuples, so configs compare equal and hash
        object.__setattr__(self, "stages", tuple(tuple(int(v) for v in s) for s in self.stages))
        object.__setattr__(self, "anchor_cm", tuple(float(v) for v in self.anchor_cm))
        object.__setattr__(self, "landmark_hidden", tuple(int(v) for v in self.landmark_hidden))

    @property
    def n_params(self) -> int:
        """Length P of the regressed parameter vector."""
        return param_layout(self)["albedo"].stop


def param_layout(config: CoarseNetConfig) -> dict[str, slice]:
    """Slices of the (B, P) parameter vector, in order (see the module docstring)."""
    sizes = [("identity", config.n_identity), ("expression", config.n_expression), ("rot6d", 6),
             ("crop_xy", 2), ("log_scale", 1), ("sh", 27), ("albedo", config.n_albedo)]
    out, start = {}, 0
    for name, n in sizes:
        out[name] = slice(start, start + n)
        start += n
    return out


def _divisible(channels: float, divisor: int = 8) -> int:
    """Round to a multiple of 8 (vector-friendly), never below 90% of the request."""
    c = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return c + divisor if c < 0.9 * channels else c


class ConvBNAct(nn.Sequential):
    """k x k conv (no bias) + BatchNorm + optional ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection, + input when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(cin, hidden, k=1))
        layers += [ConvBNAct(hidden, hidden, k=3, stride=stride, groups=hidden),
                   ConvBNAct(hidden, cout, k=1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class CoarseNet(nn.Module):
    """(B, 3, S, S) normalised RGB -> (B, P) raw parameters; `decode` turns them into χ."""

    def __init__(self, config: CoarseNetConfig | None = None):
        super().__init__()
        self.config = config = config or CoarseNetConfig()
        c = _divisible(config.stem_channels * config.width)
        layers: list[nn.Module] = [ConvBNAct(3, c, k=3, stride=2)]
        for expansion, channels, repeats, stride in config.stages:
            cout = _divisible(channels * config.width)
            for i in range(repeats):
                layers.append(InvertedResidual(c, cout, stride if i == 0 else 1, expansion))
                c = cout
        layers.append(ConvBNAct(c, config.last_channels, k=1))
        self.features = nn.Sequential(*layers)
        branch: list[nn.Module] = []
        width = 2 * config.n_landmarks
        for hidden in (config.landmark_hidden if config.n_landmarks else ()):
            branch += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.landmark_branch = nn.Sequential(*branch)
        if config.n_landmarks:
            width += 2 * config.n_landmarks if config.landmark_skip else 0
        self.head = nn.Linear(config.last_channels + (width if config.n_landmarks else 0), config.n_params)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # small head weights: the untrained net outputs ≈ the prior, not noise
        nn.init.normal_(self.head.weight, std=1e-3)
        with torch.no_grad():
            self.head.bias.copy_(prior_params(self.config))

    def embed(self, x: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """The head's input (B, F): pooled image features, the landmark branch's, the landmarks."""
        feats = self.features(x).mean(dim=(2, 3))
        if not self.config.n_landmarks:
            return feats
        if landmarks is None:
            raise ValueError(f"this CoarseNet reads {self.config.n_landmarks} tracked landmarks; none were given")
        flat = landmarks.reshape(landmarks.shape[0], -1)
        parts = [feats, self.landmark_branch(flat)] + ([flat] if self.config.landmark_skip else [])
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 3, S, S) normalised RGB, landmarks (B, L, 2) normalised crop coordinates
        (`normalise_landmarks`; required when config.n_landmarks > 0) -> (B, P)."""
        return self.head(self.embed(x, landmarks))

    def decode(self, params: torch.Tensor, K_crop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`decode` with this net's config."""
        return decode(params, K_crop, self.config)

    @property
    def n_parameters(self) -> int:
        """Trainable weights (BatchNorm running statistics excluded)."""
        return sum(p.numel() for p in self.parameters())


def preprocess(crops: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 RGB -> (B, 3, S, S) float32 in [-1, 1] (the net's input normalisation)."""
    return crops.permute(0, 3, 1, 2).to(torch.float32) * (1.0 / 127.5) - 1.0


def normalise_landmarks(landmarks_px: torch.Tensor, input_size: int) -> torch.Tensor:
    """(B, L, 2) crop px -> (B, L, 2) crop-normalised, the crop spanning [-1, 1] (crop_xy's units)."""
    c = (input_size - 1.0) / 2.0
    return (landmarks_px - c) * (2.0 / input_size)


def prior_params(config: CoarseNetConfig) -> torch.Tensor:
    """(P,) raw parameters that decode to a frontal, centred, neutral face in ambient light."""
    lay = param_layout(config)
    p = torch.zeros(config.n_params)
    p[lay["expression"]] = config.expression_prior
    # FRONTAL = diag(1, -1, -1): its first two columns
    p[lay["rot6d"]] = torch.tensor([1.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    sh = torch.zeros(9, 3)
    sh[0] = 1.0 / _SH_Y00
    p[lay["sh"]] = sh.reshape(-1)
    p[lay["albedo"]] = math.log(config.albedo_prior / (1.0 - config.albedo_prior))
    return p


# ---------------------------------------------------------------- decoding


def _normalise(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Unit vectors along the last axis (written out so the ONNX graph stays plain)."""
    return v / torch.sqrt((v * v).sum(-1, keepdim=True).clamp_min(eps))


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a × b over the last axis (torch.cross has no ONNX export)."""
    ax, ay, az = a[..., 0], a[..., 1], a[..., 2]
    bx, by, bz = b[..., 0], b[..., 1], b[..., 2]
    return torch.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], dim=-1)


def rotation_from_6d(r6: torch.Tensor) -> torch.Tensor:
    """(B, 6) = two 3-vectors -> (B, 3, 3) rotation by Gram-Schmidt; they become its first two columns."""
    b1 = _normalise(r6[..., 0:3])
    a2 = r6[..., 3:6]
    b2 = _normalise(a2 - (b1 * a2).sum(-1, keepdim=True) * b1)
    b3 = _cross(b1, b2)
    return torch.stack([b1, b2, b3], dim=-1)


def rotation_to_6d(R: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) -> (B, 6): its first two columns, the exact preimage under `rotation_from_6d`."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def _batched_K(K_crop: torch.Tensor, batch: int) -> torch.Tensor:
    K = torch.as_tensor(K_crop)
    return K.expand(batch, 3, 3) if K.dim() == 2 else K


def crop_focal_px(K_crop: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) -> (B,) focal length in px, sqrt|det K[:2, :2]| (= fx for square pixels, no skew)."""
    det = K_crop[..., 0, 0] * K_crop[..., 1, 1] - K_crop[..., 0, 1] * K_crop[..., 1, 0]
    return torch.sqrt(det.abs())


def _solve3(K: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """K⁻¹ p for (B, 3, 3), (B, 3) by cofactors (no matrix inverse op needed in ONNX)."""
    r0, r1, r2 = K[..., 0, :], K[..., 1, :], K[..., 2, :]
    c0, c1, c2 = _cross(r1, r2), _cross(r2, r0), _cross(r0, r1)
    det = (r0 * c0).sum(-1, keepdim=True)
    return (p[..., 0:1] * c0 + p[..., 1:2] * c1 + p[..., 2:3] * c2) / det


def translation_from_crop(crop_xy: torch.Tensor, log_scale: torch.Tensor, rotation: torch.Tensor,
                          K_crop: torch.Tensor, config: CoarseNetConfig | None = None) -> torch.Tensor:
    """Crop-normalised anchor position (B, 2), log_scale (B, 1), R (B, 3, 3), K_crop (B|-, 3, 3) px
    -> translation t (B, 3) cm, model -> crop camera (X_cam = R X + t)."""
    config = config or CoarseNetConfig()
    S = float(config.input_size)
    B = crop_xy.shape[0]
    K = _batched_K(K_crop, B).to(crop_xy.dtype)
    uv = (S - 1.0) / 2.0 + crop_xy * (S / 2.0)
    s = (S / config.scale_ref_cm) * torch.exp(log_scale.reshape(B, 1))         # px per cm
    z = crop_focal_px(K).unsqueeze(-1) / s                                        # (B, 1) cm
    ray = _solve3(K, torch.cat([uv, torch.ones_like(uv[:, :1])], dim=-1))
    anchor_cam = z * ray / ray[:, 2:3]
    anchor = torch.tensor(config.anchor_cm, dtype=crop_xy.dtype, device=crop_xy.device)
    return anchor_cam - (rotation @ anchor.unsqueeze(-1)).squeeze(-1)


def crop_params_from_translation(translation: torch.Tensor, rotation: torch.Tensor, K_crop: torch.Tensor,
                                 config: CoarseNetConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `translation_from_crop`: t (B, 3) cm, R (B, 3, 3), K_crop -> (crop_xy (B, 2), log_scale (B, 1))."""
    config = config or CoarseNetConfig()
    S = float(config.input_size)
    B = translation.shape[0]
    K = _batched_K(K_crop, B).to(translation.dtype)
    anchor = torch.tensor(config.anchor_cm, dtype=translation.dtype, device=translation.device)
    X = (rotation @ anchor.unsqueeze(-1)).squeeze(-1) + translation                # anchor in camera, cm
    p = (K @ X.unsqueeze(-1)).squeeze(-1)
    uv = p[:, :2] / p[:, 2:3]
    crop_xy = (uv - (S - 1.0) / 2.0) / (S / 2.0)
    s = crop_focal_px(K).unsqueeze(-1) / X[:, 2:3]
    return crop_xy, torch.log(s * config.scale_ref_cm / S)


def decode(params: torch.Tensor, K_crop: torch.Tensor | None = None,
           config: CoarseNetConfig | None = None) -> dict[str, torch.Tensor]:
    """Raw (B, P) -> χ as tensors: identity (B, n_id) prior-std units, expression (B, 53) in [0, 1]
    (expression_linear: the same unclamped, for losses),
    rotation (B, 3, 3) model -> crop camera, crop_xy (B, 2), log_scale (B, 1), sh (B, 9, 3),
    albedo (B, n_albedo) in [0, 1], and translation (B, 3) cm in the crop camera when K_crop
    ((3, 3) or (B, 3, 3), px) is given."""
    config = config or CoarseNetConfig()
    lay = param_layout(config)
    B = params.shape[0]
    out = {
        "identity": params[:, lay["identity"]],
        "expression": params[:, lay["expression"]].clamp(0.0, 1.0),
        "expression_linear": params[:, lay["expression"]],
        "rotation": rotation_from_6d(params[:, lay["rot6d"]]),
        "crop_xy": params[:, lay["crop_xy"]],
        "log_scale": params[:, lay["log_scale"]],
        "sh": params[:, lay["sh"]].reshape(B, 9, 3),
        "albedo": torch.sigmoid(params[:, lay["albedo"]]),
    }
    if K_crop is not None:
        out["translation"] = translation_from_crop(out["crop_xy"], out["log_scale"], out["rotation"],
                                                   K_crop, config)
    return out


class CoarseNetInference(nn.Module):
    """crops (B, S, S, 3) uint8 + K_crop (B, 3, 3) [+ landmarks (B, L, 2) crop px] -> the decoded
    outputs named `output_names`, in that order (engine.runtime.OUTPUT_NAMES).

    The one graph every runtime executes (and the one exported to ONNX)."""

    def __init__(self, net: CoarseNet, output_names: tuple[str, ...]):
        super().__init__()
        self.net = net
        self.output_names = tuple(output_names)

    def forward(self, crops: torch.Tensor, K_crop: torch.Tensor,
                landmarks: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        S = self.net.config.input_size
        lm = None if landmarks is None else normalise_landmarks(landmarks, S)
        out = decode(self.net(preprocess(crops), lm), K_crop, self.net.config)
        return tuple(out[k] for k in self.output_names)


# ---------------------------------------------------------------- weights and cost


def save_weights(model: CoarseNet, path: str | Path) -> None:
    """A .pt file: {format, config (plain dict), state_dict} (float32, a few MB)."""
    torch.save({"format": WEIGHTS_FORMAT, "config": asdict(model.config),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, Path(path))


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> CoarseNet:
    """The CoarseNet saved by `save_weights`, in eval mode (loaded with weights_only: no pickled code)."""
    blob = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a CoarseNet weights file ({WEIGHTS_FORMAT})")
    model = CoarseNet(CoarseNetConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def count_macs(model: nn.Module, input_size: int | None = None) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for one (1, 3, S, S) input (and its
    landmarks), counted by hooks."""
    size = input_size or model.config.input_size
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    L = model.config.n_landmarks
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size), torch.zeros(1, L, 2) if L else None)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total
