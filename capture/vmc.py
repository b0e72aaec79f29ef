"""The vmc:// stream: VMC protocol (OSC over UDP) to VSeeFace, Warudo, VNyan, VirtualMotionCapture...

Each frame is sent as OSC bundles of at most MAX_BUNDLE_BYTES (1,452) bytes:
the VMC specification asks for bundles of 1,500 bytes at most, because over
Wi-Fi a larger datagram is split into IP fragments and losing any one loses
it all; 1,452 bytes of UDP payload fit one 1,500-byte Ethernet or Wi-Fi frame
with IPv6's or IPv4's headers. Receivers buffer blend values until Apply, so a
frame may span several bundles; in order:

    /VMC/Ext/Blend/Val  (s name, f value)       x 52, ARKit order, as many per bundle as fit
    /VMC/Ext/Blend/Apply                         } always together in the last bundle,
    /VMC/Ext/Bone/Pos   (s "Head", f px py pz, f qx qy qz qw)    } so a frame's pose and
    /VMC/Ext/OK         (i loaded=1, i calibration state=3,      } Apply arrive together
                         i calibration mode=0, i tracking 1|0)   }
    /VMC/Ext/T          (f seconds: the frame's time since capture started)

A face frame is two bundles (about 2.8 KB in all). A frame without a face
sends one bundle with only OK (tracking 0) and T, so the avatar holds its
last pose and expression instead of snapping to neutral.

Names. The specification's names are case-sensitive, and VMagicMirror's Perfect
Sync clips are PascalCase (EyeBlinkLeft), so that is the default; ``names=camel`` sends ARKit's own camelCase (eyeBlinkLeft) for
receivers set up with it (``names=arkit`` is the same). EVMC4U lower-cases
names before matching, so either works there.

Head rotation. R_head is in ARKit's face-anchor frame (+x the subject's
left, +y up, +z out of the face). A VMC bone rotation is Unity's local
rotation of the humanoid Head bone, whose frame (normalised VRM rig at rest)
has +x the avatar's right, +y up, +z forward out of the face. The two frames
differ by a mirror of x, M = diag(-1, 1, 1), so R_unity = M R_head M; its
quaternion is (qx, -qy, -qz, qw) of R_head's. The avatar is the subject's
own body, not a mirror image: a turn toward the subject's left turns the
avatar toward its own left (a negative Unity yaw).

Head position. VMC bone positions are local (relative to the parent bone,
Neck) and senders normally send the bone's rest offset. Receivers built on
EVMC4U (the protocol's reference receiver) apply bone positions by default
(BonePositionSynchronize), so (0, 0, 0) would sink the head into the neck.
We have no avatar, so we send a typical neck-to-head offset, 0.08 m up,
changeable with ``head_pos=X,Y,Z`` (metres, Unity axes; set it to the
avatar's Head localPosition for an exact fit). The tracked head translation
is not sent: moving the head bone off the neck would detach it.

No /VMC/Ext/Root/Pos is sent: a face tracker knows nothing of the body's
place in the room, and EVMC4U applies a received root pose to the model
(RootPositionSynchronize), which would pin the avatar to the origin.

Options (URL query): ``names=pascal`` (default) or ``names=camel``; ``head_pos=X,Y,Z``.
"""
from __future__ import annotations

import math

import numpy as np

from capture.osc import osc_bundle, osc_message
from capture.streams import StreamError, StreamFrame, UdpStream
from engine.arkit import ARKIT_NAMES, pascal_case

#: Blend shape name styles for the names= option (arkit: the same as camel).
NAME_STYLES = {
    "pascal": tuple(pascal_case(n) for n in ARKIT_NAMES),
    "camel": ARKIT_NAMES,
    "arkit": ARKIT_NAMES,
}
PASCAL_NAMES = NAME_STYLES["pascal"]

#: Largest bundle (UDP payload) sent: 1,500-byte frame - 40 (IPv6 header) - 8 (UDP header).
MAX_BUNDLE_BYTES = 1452
#: A bundle's own bytes before its elements: "#bundle\0" and the 8-byte time tag.
_BUNDLE_HEADER_BYTES = 16

#: Head bone local position (metres, Unity axes) relative to the Neck: a
#: typical VRoid-sized avatar's rest offset (unverified for any given avatar).
DEFAULT_HEAD_POSITION_M = (0.0, 0.08, 0.0)

#: /VMC/Ext/OK calibration fields (protocol v2.5): 3 = calibrated, 0 = normal mode.
CALIBRATED = 3
NORMAL_MODE = 0


def unity_head_quaternion(R_head: np.ndarray) -> tuple[float, float, float, float]:
    """R_head (3, 3) in ARKit's face frame -> Unity quaternion (x, y, z, w), w >= 0."""
    M = np.diag([-1.0, 1.0, 1.0])
    return quaternion_xyzw(M @ np.asarray(R_head, dtype=np.float64) @ M)


def quaternion_xyzw(R: np.ndarray) -> tuple[float, float, float, float]:
    """Rotation matrix (3, 3) -> unit quaternion (x, y, z, w) with w >= 0.

    Shepperd's method: divides by the largest of the four candidate terms,
    so it stays accurate near 180 degrees where w is near 0.
    """
    t = np.trace(R)
    diag = np.diag(R)
    k = int(np.argmax([t, *diag]))
    if k == 0:
        s = 2.0 * math.sqrt(max(1.0 + t, 0.0))
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, s / 4.0]
    else:
        i = k - 1
        j, m = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * math.sqrt(max(1.0 + R[i, i] - R[j, j] - R[m, m], 0.0))
        q = [0.0, 0.0, 0.0, (R[m, j] - R[j, m]) / s]
        q[i] = s / 4.0
        q[j] = (R[j, i] + R[i, j]) / s
        q[m] = (R[m, i] + R[i, m]) / s
    q = np.asarray(q) / np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    return tuple(float(v) for v in q)


def vmc_bundles(frame: StreamFrame, names=PASCAL_NAMES,
                head_position_m=DEFAULT_HEAD_POSITION_M) -> list[bytes]:
    """One frame -> its OSC bundles, each at most MAX_BUNDLE_BYTES (layout in the module docstring).

    Blend values fill bundles in order; Apply, the head bone, OK and T always
    travel together in the last one.
    """
    found = frame.face_found and frame.blendshapes is not None
    values_messages = []
    last = []
    if found:
        values = np.clip(np.nan_to_num(np.asarray(frame.blendshapes, dtype=np.float64)), 0.0, 1.0)
        if values.shape != (len(names),):
            raise ValueError(f"expected {len(names)} blendshapes, got shape {values.shape}")
        values_messages = [osc_message("/VMC/Ext/Blend/Val", name, float(v)) for name, v in zip(names, values)]
        last.append(osc_message("/VMC/Ext/Blend/Apply"))
        if frame.head_rotation is not None:
            last.append(osc_message("/VMC/Ext/Bone/Pos", "Head", *map(float, head_position_m),
                                    *unity_head_quaternion(frame.head_rotation)))
    last.append(osc_message("/VMC/Ext/OK", 1, CALIBRATED, NORMAL_MODE, 1 if found else 0))
    time_s = float(frame.time_s) if math.isfinite(frame.time_s) else 0.0
    last.append(osc_message("/VMC/Ext/T", time_s))
    return pack_bundles(values_messages, last)


def pack_bundles(messages: list[bytes], last: list[bytes], limit: int = MAX_BUNDLE_BYTES) -> list[bytes]:
    """Messages in order into as few bundles of at most `limit` bytes as they fill, with every
    message of `last` in the final bundle (so the final one holds some of `messages` only
    where they fit beside `last`)."""
    def size(group):
        return _BUNDLE_HEADER_BYTES + sum(4 + len(m) for m in group)  # each element has an int32 length

    if size(last) > limit or any(size([m]) > limit for m in messages):
        raise ValueError(f"an OSC message does not fit a {limit}-byte bundle")
    groups, group, used = [], [], _BUNDLE_HEADER_BYTES
    for message in messages:
        if used + 4 + len(message) > limit:
            groups.append(group)
            group, used = [], _BUNDLE_HEADER_BYTES
        group.append(message)
        used += 4 + len(message)
    if used + size(last) - _BUNDLE_HEADER_BYTES > limit:
        groups.append(group)
        group = []
    groups.append(group + last)
    return [osc_bundle(g) for g in groups if g]


def _parse_position(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise StreamError(f"vmc:// head_pos must be three numbers in metres, e.g. 0,0.08,0; got {text!r}")
    return values


class VmcStream(UdpStream):
    """Sends each frame as VMC bundles (see vmc_bundles) to a Marionette (receiver) app."""

    scheme = "vmc"
    default_port = 39539

    def __init__(self, host: str, port: int, **options: str):
        unknown = sorted(set(options) - {"names", "head_pos"})
        if unknown:
            raise StreamError(f"unknown vmc:// option(s) {', '.join(unknown)}; known: names, head_pos")
        style = options.get("names", "pascal")
        if style not in NAME_STYLES:
            raise StreamError(f"vmc:// names must be one of {', '.join(NAME_STYLES)}; got {style!r}")
        head_position = _parse_position(options["head_pos"]) if "head_pos" in options else DEFAULT_HEAD_POSITION_M
        super().__init__(host, port)
        self.names = NAME_STYLES[style]
        self.head_position_m = head_position

    def send(self, frame: StreamFrame) -> None:
        self.send_datagrams(vmc_bundles(frame, self.names, self.head_position_m), frame.captured_s)
