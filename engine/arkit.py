"""ARKit blendshape names and the mapping from the ICT face model's 53 shapes.

Convention: ARKit's ``Left`` is the subject's own left (Apple's
ARFaceAnchor: +x points to the viewer's right, which is the face's left).
The ICT model's ``_L`` is also the subject's left (its +x is the subject's
left), so ``eyeBlink_L`` becomes ``eyeBlinkLeft`` with no swap. In an
unmirrored camera image the subject's left eye is on the image's right.

ARKit has one ``browInnerUp`` and one ``cheekPuff`` where the model has left
and right halves: the ARKit value is the mean of the two halves. ARKit's
``tongueOut`` has no model shape and is always 0.
"""
from __future__ import annotations

import numpy as np

#: The 52 ARKit names in Apple's ARFaceAnchor.BlendShapeLocation order.
ARKIT_NAMES: tuple[str, ...] = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft",
    "eyeLookUpLeft", "eyeSquintLeft", "eyeWideLeft",
    "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight",
    "eyeLookUpRight", "eyeSquintRight", "eyeWideRight",
    "jawForward", "jawLeft", "jawRight", "jawOpen",
    "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight",
    "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight",
    "mouthUpperUpLeft", "mouthUpperUpRight",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "noseSneerLeft", "noseSneerRight",
    "tongueOut",
)

#: Live Link Face CSV column order of the 52 shapes (PascalCase). It differs
#: from Apple's order at JawRight/JawLeft and MouthRight/MouthLeft.
LIVELINK_CSV_NAMES: tuple[str, ...] = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft",
    "EyeLookUpLeft", "EyeSquintLeft", "EyeWideLeft",
    "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight",
    "EyeLookUpRight", "EyeSquintRight", "EyeWideRight",
    "JawForward", "JawRight", "JawLeft", "JawOpen",
    "MouthClose", "MouthFunnel", "MouthPucker", "MouthRight", "MouthLeft",
    "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft", "MouthFrownRight",
    "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
    "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper",
    "MouthPressLeft", "MouthPressRight", "MouthLowerDownLeft", "MouthLowerDownRight",
    "MouthUpperUpLeft", "MouthUpperUpRight",
    "BrowDownLeft", "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight",
    "CheekPuff", "CheekSquintLeft", "CheekSquintRight",
    "NoseSneerLeft", "NoseSneerRight",
    "TongueOut",
)

#: The 52 shapes in Unreal's EARFaceBlendShape enum order (ARTrackable.h), the
#: order of the first 52 floats of a Live Link Face UDP packet. It is Apple's
#: order (ARKIT_NAMES) in PascalCase; the CSV order above differs from it at
#: JawLeft/JawRight and MouthLeft/MouthRight, so never index one by the other.
LIVELINK_UDP_NAMES: tuple[str, ...] = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft",
    "EyeLookUpLeft", "EyeSquintLeft", "EyeWideLeft",
    "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight",
    "EyeLookUpRight", "EyeSquintRight", "EyeWideRight",
    "JawForward", "JawLeft", "JawRight", "JawOpen",
    "MouthClose", "MouthFunnel", "MouthPucker", "MouthLeft", "MouthRight",
    "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft", "MouthFrownRight",
    "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
    "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper",
    "MouthPressLeft", "MouthPressRight", "MouthLowerDownLeft", "MouthLowerDownRight",
    "MouthUpperUpLeft", "MouthUpperUpRight",
    "BrowDownLeft", "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight",
    "CheekPuff", "CheekSquintLeft", "CheekSquintRight",
    "NoseSneerLeft", "NoseSneerRight",
    "TongueOut",
)

#: The 9 values after the shapes in a Live Link Face row, radians.
LIVELINK_POSE_NAMES: tuple[str, ...] = (
    "HeadYaw", "HeadPitch", "HeadRoll",
    "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
    "RightEyeYaw", "RightEyePitch", "RightEyeRoll",
)

#: engine/pose.py's yaw, pitch, roll (head, left eye, right eye) times these are Live Link
#: Face's, and back: the app's yaw > 0 turns toward the subject's right and its roll > 0
#: tilts toward the left shoulder (Unreal's ARKit conversion negates yaw and roll of the
#: head and eyes together); pitch > 0 tips down in both.
LIVELINK_POSE_SIGNS = np.array([-1.0, 1.0, -1.0] * 3)


def livelink_pose(head_ypr_rad, left_eye_ypr_rad, right_eye_ypr_rad) -> np.ndarray:
    """Three (3,) yaw/pitch/roll in engine/pose.py's convention -> the 9 Live Link values (radians)."""
    parts = [np.asarray(p, dtype=np.float64).reshape(-1) for p in (head_ypr_rad, left_eye_ypr_rad, right_eye_ypr_rad)]
    if any(p.shape != (3,) for p in parts):
        raise ValueError("head/eye yaw pitch roll must each be (3,)")
    return np.concatenate(parts) * LIVELINK_POSE_SIGNS + 0.0  # + 0.0: no '-0.000000' in files


def swap_mouth_left_right(blendshapes) -> np.ndarray:
    """A copy of 52 ARKit values (Apple order) with mouthLeft and mouthRight exchanged.

    Some Live Link Face versions report the two swapped; files and streams meant
    to match such takes swap them too (--swap-mouth-lr).
    """
    values = np.array(blendshapes, dtype=np.float64, copy=True)
    left, right = ARKIT_NAMES.index("mouthLeft"), ARKIT_NAMES.index("mouthRight")
    values[..., [left, right]] = values[..., [right, left]]
    return values


def pascal_case(name: str) -> str:
    """``eyeBlinkLeft`` -> ``EyeBlinkLeft``."""
    return name[0].upper() + name[1:]


def arkit_name_of_model_shape(model_name: str) -> str:
    """ICT shape name -> ARKit name: ``eyeBlink_L`` -> ``eyeBlinkLeft``."""
    if model_name.endswith("_L"):
        return model_name[:-2] + "Left"
    if model_name.endswith("_R"):
        return model_name[:-2] + "Right"
    return model_name


def arkit_mapping_matrix(model_names) -> np.ndarray:
    """(52, M) matrix W so that arkit = W @ model_weights.

    Each ARKit shape is the model shape of the same name, or the mean of the
    model's left and right halves where ARKit has one symmetric shape.
    Raises ValueError if a model name maps to no ARKit shape.
    """
    index = {n: i for i, n in enumerate(ARKIT_NAMES)}
    W = np.zeros((len(ARKIT_NAMES), len(model_names)), dtype=np.float32)
    for j, name in enumerate(model_names):
        target = arkit_name_of_model_shape(str(name))
        if target in index:
            W[index[target], j] = 1.0
            continue
        merged = target.removesuffix("Left").removesuffix("Right")
        if merged not in index:
            raise ValueError(f"model shape {name!r} has no ARKit counterpart")
        W[index[merged], j] = 0.5
    return W


def arkit_from_model(weights: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(..., M) model expression weights -> (..., 52) ARKit values in [0, 1]."""
    return np.clip(weights @ mapping.T, 0.0, 1.0)
