"""The vrchat:// stream: VRCFaceTracking "Unified Expressions v2" avatar parameters over VRChat OSC.

Avatars built for VRCFaceTracking (VRCFT) animate their face from float
parameters named ``v2/<Name>``. This stream computes those parameters from
the 52 ARKit shapes and the eye angles and sends each one as its own OSC
message ``/avatar/parameters/<prefix>v2/<Name> (f value)`` to VRChat's OSC
input (UDP 9000 by default). Run it *instead of* VRCFT, not beside it: both
would write the same parameters.

One datagram per parameter, not a bundle: VRChat's OSC documentation only
describes single messages, and although its OSC library (OscCore) parses
bundles, we did not confirm that VRChat applies avatar parameters that come
inside one. A face frame is 97 datagrams of 36-52 bytes plus the prefix (91 when
the frame has no eye angles): under 1 ms of CPU, trivial traffic on loopback.
VRChat ignores parameters the avatar does not have.

No face: nothing is sent. VRChat keeps each parameter's last value, so the
avatar holds its last expression (as it does when VRCFT's tracking module
stops updating).

Options (URL query): ``prefix`` -- a parameter path before ``v2/``, e.g.
``prefix=FT/`` sends ``/avatar/parameters/FT/v2/JawOpen`` (VRCFT finds
parameters under any such prefix; slashes around it are normalised).

Sources. Parameter names and ranges: VRCFT's documentation, "VRCFaceTracking
Parameters" (docs.vrcft.io/docs/tutorial-avatars/tutorial-avatars-extras/parameters).
ARKit -> Unified base shapes: docs.vrcft.io ".../compatibility/arkit" and
VRCFT's Live Link module (ARKit input). Combined parameters: the formulas of
VRCFT's UnifiedExpressionsParameters.cs and UnifiedSimplifier, evaluated
on those base shapes. Reimplemented here, not copied.

Mapping (ARKit names abbreviated: L/R = the subject's own left/right as in
both ARKit and VRCFT; every result is clipped to its range; "x" below marks
parameters sent per side with the same formula):

Eye gaze, from eyes_ypr_rad (yaw > 0 looks toward the subject's left,
pitch > 0 looks down). VRCFT's +X looks to the subject's right and +Y up,
and VRCFT reads X and Y as tangents (its yaw = atan(X), pitch = atan(Y)),
so each is the tangent of the angle, clipped to -1..1 (45 degrees; VRCFT's
docs describe 45 degrees as 1 for blend trees):

    EyeLeftX,  EyeRightX    tan(-yaw)   of that eye                -1..1
    EyeLeftY,  EyeRightY    tan(-pitch) of that eye                -1..1
    EyeX, EyeY              mean of the two eyes' tangents          -1..1

Eyes

    EyeLidL/R               0.75 (1 - eyeBlinkL/R) + 0.25 eyeWideL/R   0..1
                            (0 closed, 0.75 open, 1 wide)
    EyeLid                  mean of EyeLidLeft, EyeLidRight          0..1
    EyeSquintL/R            eyeSquintL/R                             0..1
    EyeSquint               max(eyeSquintLeft, eyeSquintRight)       0..1

Brows

    BrowPinchL/R, BrowLowererL/R, BrowDownL/R    browDownL/R         0..1
    BrowInnerUpL/R, BrowInnerUp                  browInnerUp         0..1
    BrowOuterUpL/R                               browOuterUpL/R      0..1
    BrowOuterUp             mean(browOuterUpLeft, browOuterUpRight)  0..1
    BrowUp                  mean over sides of 0.6 browOuterUpL/R + 0.4 browInnerUp   0..1
    BrowExpressionL/R       min(1, 0.5 browInnerUp + 0.5 browOuterUpL/R) - browDownL/R  -1..1
    BrowExpression          mean of BrowExpressionLeft, Right       -1..1

Nose and cheeks

    NoseSneerL/R            noseSneerL/R                             0..1
    NoseSneer               mean(noseSneerLeft, noseSneerRight)      0..1
    CheekSquintL/R          cheekSquintL/R                           0..1
    CheekSquint             mean(cheekSquintLeft, cheekSquintRight)  0..1
    CheekPuffSuckL/R, CheekPuffSuck   cheekPuff (ARKit has no suck) -1..1

Jaw

    JawOpen                 jawOpen                                  0..1
    MouthClosed             mouthClose                               0..1
    JawX                    jawRight - jawLeft                      -1..1
    JawZ                    jawForward (ARKit has no backward)      -1..1

Lips (ARKit has one value for all four quarters of the lips)

    LipSuckUpperL/R, LipSuckUpper       mouthRollUpper               0..1
    LipSuckLowerL/R, LipSuckLower       mouthRollLower               0..1
    LipSuck                 mean(mouthRollUpper, mouthRollLower)     0..1
    LipFunnel{Upper,Lower}L/R, LipFunnelUpper, LipFunnelLower, LipFunnel   mouthFunnel  0..1
    LipPucker{Upper,Lower}L/R, LipPuckerUpper, LipPuckerLower, LipPucker   mouthPucker  0..1

Mouth

    MouthUpperUpL/R         mouthUpperUpL/R                          0..1
    MouthLowerDownL/R       mouthLowerDownL/R                        0..1
    MouthUpperUp            mean(mouthUpperUpLeft, Right)            0..1
    MouthLowerDown          mean(mouthLowerDownLeft, Right)          0..1
    MouthOpen               mean of the four above                   0..1
    MouthUpperX, MouthLowerX, MouthX    mouthRight - mouthLeft      -1..1
    MouthCornerPullL/R, MouthCornerSlantL/R, MouthSmileL/R   mouthSmileL/R   0..1
    MouthFrownL/R           mouthFrownL/R                            0..1
    MouthStretchL/R         mouthStretchL/R                          0..1
    MouthDimpleL/R          mouthDimpleL/R                           0..1
    MouthPressL/R           mouthPressL/R                            0..1
    MouthRaiserUpper        mouthShrugUpper                          0..1
    MouthRaiserLower        mouthShrugLower                          0..1
    MouthSadL/R             max(mouthFrownL/R, mouthStretchL/R)      0..1
    SmileFrownL/R           mouthSmileL/R - mouthFrownL/R           -1..1
    SmileFrown              mean of SmileFrownLeft, Right           -1..1
    SmileSadL/R             mouthSmileL/R - MouthSadL/R             -1..1
    SmileSad                mean of SmileSadLeft, Right             -1..1

Tongue

    TongueOut               tongueOut                                0..1

Not sent (no ARKit source): pupil dilation/diameter, nasal dilation and
constriction, jaw clench and mandible raise, lip suck corners, mouth
tightener and upper deepen, tongue direction/roll/shape/twist, neck and
throat, and VRCFT's *TrackingActive status flags.
"""
from __future__ import annotations

import math

import numpy as np

from capture.osc import osc_message
from capture.streams import StreamError, StreamFrame, UdpStream
from engine.arkit import ARKIT_NAMES

#: Characters OSC reserves in address patterns; a prefix may not hold them.
_OSC_RESERVED = set(" #*,?[]{}")

_SIDES = ("Left", "Right")


def _eye_parameters(eyes_ypr_rad) -> dict[str, float]:
    """Gaze parameters from (2, 3) [yaw, pitch, roll] radians, left eye first: tangents, as VRCFT reads them."""
    eyes = np.clip(np.nan_to_num(np.asarray(eyes_ypr_rad, dtype=np.float64)), -math.pi / 2, math.pi / 2)
    x, y = np.tan(-eyes[:, 0]), np.tan(-eyes[:, 1])
    return {"EyeLeftX": x[0], "EyeLeftY": y[0], "EyeRightX": x[1], "EyeRightY": y[1],
            "EyeX": (x[0] + x[1]) / 2, "EyeY": (y[0] + y[1]) / 2}


def vrchat_parameters(blendshapes, eyes_ypr_rad=None) -> dict[str, float]:
    """52 ARKit values (Apple order) and optional eye angles -> {v2 name: value}.

    Names are without the ``v2/`` part; the table in the module docstring
    gives every formula. Gaze parameters are left out when eyes_ypr_rad is None.
    """
    values = np.clip(np.nan_to_num(np.asarray(blendshapes, dtype=np.float64)), 0.0, 1.0)
    if values.shape != (len(ARKIT_NAMES),):
        raise ValueError(f"expected {len(ARKIT_NAMES)} blendshapes, got shape {values.shape}")
    a = dict(zip(ARKIT_NAMES, (float(v) for v in values)))

    p: dict[str, float] = {}
    if eyes_ypr_rad is not None:
        p.update(_eye_parameters(eyes_ypr_rad))

    inner_up = a["browInnerUp"]
    for side in _SIDES:
        p[f"EyeLid{side}"] = 0.75 * (1.0 - a[f"eyeBlink{side}"]) + 0.25 * a[f"eyeWide{side}"]
    p["EyeLid"] = (p["EyeLidLeft"] + p["EyeLidRight"]) / 2
    for side in _SIDES:
        p[f"EyeSquint{side}"] = a[f"eyeSquint{side}"]
    p["EyeSquint"] = max(a["eyeSquintLeft"], a["eyeSquintRight"])

    for side in _SIDES:
        down, outer = a[f"browDown{side}"], a[f"browOuterUp{side}"]
        p[f"BrowPinch{side}"] = p[f"BrowLowerer{side}"] = p[f"BrowDown{side}"] = down
        p[f"BrowInnerUp{side}"] = inner_up
        p[f"BrowOuterUp{side}"] = outer
        p[f"BrowExpression{side}"] = min(1.0, 0.5 * inner_up + 0.5 * outer) - down
    p["BrowInnerUp"] = inner_up
    p["BrowOuterUp"] = (a["browOuterUpLeft"] + a["browOuterUpRight"]) / 2
    p["BrowUp"] = 0.6 * p["BrowOuterUp"] + 0.4 * inner_up
    p["BrowExpression"] = (p["BrowExpressionLeft"] + p["BrowExpressionRight"]) / 2

    for side in _SIDES:
        p[f"NoseSneer{side}"] = a[f"noseSneer{side}"]
        p[f"CheekSquint{side}"] = a[f"cheekSquint{side}"]
        p[f"CheekPuffSuck{side}"] = a["cheekPuff"]
    p["NoseSneer"] = (a["noseSneerLeft"] + a["noseSneerRight"]) / 2
    p["CheekSquint"] = (a["cheekSquintLeft"] + a["cheekSquintRight"]) / 2
    p["CheekPuffSuck"] = a["cheekPuff"]

    p["JawOpen"] = a["jawOpen"]
    p["MouthClosed"] = a["mouthClose"]
    p["JawX"] = a["jawRight"] - a["jawLeft"]
    p["JawZ"] = a["jawForward"]

    for side in _SIDES:
        p[f"LipSuckUpper{side}"] = a["mouthRollUpper"]
        p[f"LipSuckLower{side}"] = a["mouthRollLower"]
        for lip in ("Upper", "Lower"):
            p[f"LipFunnel{lip}{side}"] = a["mouthFunnel"]
            p[f"LipPucker{lip}{side}"] = a["mouthPucker"]
    p["LipSuckUpper"] = a["mouthRollUpper"]
    p["LipSuckLower"] = a["mouthRollLower"]
    p["LipSuck"] = (a["mouthRollUpper"] + a["mouthRollLower"]) / 2
    for part in ("LipFunnelUpper", "LipFunnelLower", "LipFunnel"):
        p[part] = a["mouthFunnel"]
    for part in ("LipPuckerUpper", "LipPuckerLower", "LipPucker"):
        p[part] = a["mouthPucker"]

    for side in _SIDES:
        smile, frown, stretch = a[f"mouthSmile{side}"], a[f"mouthFrown{side}"], a[f"mouthStretch{side}"]
        p[f"MouthUpperUp{side}"] = a[f"mouthUpperUp{side}"]
        p[f"MouthLowerDown{side}"] = a[f"mouthLowerDown{side}"]
        p[f"MouthCornerPull{side}"] = p[f"MouthCornerSlant{side}"] = p[f"MouthSmile{side}"] = smile
        p[f"MouthFrown{side}"] = frown
        p[f"MouthStretch{side}"] = stretch
        p[f"MouthDimple{side}"] = a[f"mouthDimple{side}"]
        p[f"MouthPress{side}"] = a[f"mouthPress{side}"]
        p[f"MouthSad{side}"] = max(frown, stretch)
        p[f"SmileFrown{side}"] = smile - frown
        p[f"SmileSad{side}"] = smile - max(frown, stretch)
    p["MouthUpperUp"] = (a["mouthUpperUpLeft"] + a["mouthUpperUpRight"]) / 2
    p["MouthLowerDown"] = (a["mouthLowerDownLeft"] + a["mouthLowerDownRight"]) / 2
    p["MouthOpen"] = (p["MouthUpperUp"] + p["MouthLowerDown"]) / 2
    p["MouthUpperX"] = p["MouthLowerX"] = p["MouthX"] = a["mouthRight"] - a["mouthLeft"]
    p["MouthRaiserUpper"] = a["mouthShrugUpper"]
    p["MouthRaiserLower"] = a["mouthShrugLower"]
    p["SmileFrown"] = (p["SmileFrownLeft"] + p["SmileFrownRight"]) / 2
    p["SmileSad"] = (p["SmileSadLeft"] + p["SmileSadRight"]) / 2

    p["TongueOut"] = a["tongueOut"]
    return {name: max(-1.0, min(1.0, float(v))) for name, v in p.items()}


def _normalise_prefix(prefix: str) -> str:
    """'FT', '/FT/', 'FT/' -> 'FT/'; '' -> ''. Raises StreamError on characters OSC reserves."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    bad = sorted(set(stripped) & _OSC_RESERVED) + (["//"] if "//" in stripped else [])
    if bad or not stripped.isprintable():
        raise StreamError(f"vrchat:// prefix {prefix!r} has characters an OSC address cannot hold: {bad}")
    return stripped + "/"


class VRChatStream(UdpStream):
    """Sends VRCFaceTracking v2 avatar parameters to VRChat's OSC input."""

    scheme = "vrchat"
    default_port = 9000

    def __init__(self, host: str, port: int, **options: str):
        unknown = sorted(set(options) - {"prefix"})
        if unknown:
            raise StreamError(f"unknown vrchat:// option(s) {', '.join(unknown)}; known: prefix")
        self.prefix = _normalise_prefix(options.get("prefix", ""))
        super().__init__(host, port)

    def address(self, name: str) -> str:
        """'JawOpen' -> '/avatar/parameters/<prefix>v2/JawOpen'."""
        return f"/avatar/parameters/{self.prefix}v2/{name}"

    def send(self, frame: StreamFrame) -> None:
        if not frame.face_found or frame.blendshapes is None:
            return
        parameters = vrchat_parameters(frame.blendshapes, frame.eyes_ypr_rad)
        self.send_datagrams([osc_message(self.address(name), value) for name, value in parameters.items()],
                            frame.captured_s)
