"""Unreal Live Link Face over UDP: `--stream livelink://HOST:PORT` (port 11111).

Sends what Epic's Live Link Face iPhone app sends, so Unreal's "Apple ARKit"
Live Link source (and anything else that reads that app) takes this program
for a phone. One datagram per frame, packet version 6, every number
big-endian (network byte order):

    uint8    version, 6
    int32    device id length n, then n bytes of UTF-8 (no terminator)
    int32    subject name length m, then m bytes of UTF-8
    int32    frame number          } Unreal's FQualifiedFrameTime: the frame
    float32  sub-frame, [0, 1)     } time as a frame number and fraction at
    int32    frame rate numerator  } the rate numerator / denominator
    int32    frame rate denominator}
    uint8    value count, 61
    float32  x 61: the 52 shapes in EARFaceBlendShape order
             (engine/arkit.py LIVELINK_UDP_NAMES), then HeadYaw, HeadPitch,
             HeadRoll, LeftEyeYaw, LeftEyePitch, LeftEyeRoll, RightEyeYaw,
             RightEyePitch, RightEyeRoll

Epic publishes no specification; the layout is read from Unreal's own
sender and receiver (AppleARKitLiveLinkSource.cpp, packet version 6) and its
network-byte-order serializer, and has not been checked against a live
Unreal editor here. The device id is a 36-character UUID, as the app sends
(Python receivers such as PyLiveLinkFace's decoder read it at fixed offsets).

Angles are radians, as the app streams them and writes them in its CSV
(angles=halfturns sends degrees / 180, what Unreal's own ARKit code writes
for its curves). Signs are the app's, not engine/pose.py's: Unreal's ARKit
conversion negates yaw and roll of the head and of both eyes together, so
yaw > 0 turns the head (or an eye) toward the subject's *right*, roll > 0
tilts the head toward the subject's left shoulder, and pitch > 0 still tips
the chin (or the gaze) down. In real app exports eye yaw rises about
0.6 rad per unit of the rightward look shapes (EyeLookInLeft - EyeLookOutLeft,
EyeLookOutRight - EyeLookInRight); engine/pose.py's yaw and roll are the
negatives of these (see livelink_angles).

Options (URL query): subject (Live Link subject name, default "capture"),
device (device id; default a UUID derived from the host name, stable per
machine), fps (frame rate of the frame numbers: 30, 29.97 or 30000/1001;
default the frame's own rate), angles (radians or halfturns),
swap_mouth_lr (1: send mouthLeft as MouthRight and mouthRight as MouthLeft,
to match takes from Live Link Face versions that swap the two).

A frame without a face sends nothing: Unreal keeps showing the last pose
rather than snapping the face to neutral, and the stream resumes when the face
returns.
"""
from __future__ import annotations

import math
import socket
import struct
import uuid
from fractions import Fraction

import numpy as np

from capture.streams import StreamError, StreamFrame, UdpStream
from engine.arkit import ARKIT_NAMES, LIVELINK_UDP_NAMES, livelink_pose, pascal_case, swap_mouth_left_right

PACKET_VERSION = 6
VALUE_COUNT = 61  # EARFaceBlendShape::MAX: 52 shapes + head yaw/pitch/roll + 2 eyes x yaw/pitch/roll
#: Unreal's receive buffer is sized for 256 TCHARs per name; keep each name well inside it.
MAX_NAME_BYTES = 255
ANGLE_SCALES = {"radians": 1.0, "halfturns": 1.0 / math.pi}
#: FFrameTime's largest sub-frame, the float just below 1.
MAX_SUBFRAME = 0.99999994
#: Frames of float noise ignored when a time is turned into a frame number.
FRAME_TOLERANCE = 1e-6
#: Namespace of the default device ids (uuid5 of the host name in it).
DEVICE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "capture.livelink.device")

# ARKit index of each shape in packet order; the two orders happen to agree,
# but the map is built by name so a reordered table cannot go unnoticed.
_ARKIT_INDEX = {pascal_case(name): i for i, name in enumerate(ARKIT_NAMES)}
_PACKET_ORDER = np.array([_ARKIT_INDEX[name] for name in LIVELINK_UDP_NAMES])


def default_device_id(host_name: str | None = None) -> str:
    """A 36-character UUID (upper case, as iOS writes them) derived from the host name: the
    same on every run on one machine, different between machines."""
    name = socket.gethostname() if host_name is None else host_name
    return str(uuid.uuid5(DEVICE_NAMESPACE, name)).upper()


def frame_rate(fps: float) -> tuple[int, int]:
    """Frames per second -> Unreal's (numerator, denominator).

    NTSC rates (23.976, 29.97, 59.94, ...) become n*1000/1001; a rate that is
    missing, zero or not finite counts as 30.
    """
    if not (math.isfinite(fps) and fps > 0):
        return 30, 1
    for n in (24, 30, 48, 60, 120, 240):
        if abs(fps - n * 1000 / 1001) < 5e-3:
            return n * 1000, 1001
    rate = Fraction(fps).limit_denominator(1000)
    return rate.numerator, rate.denominator


def parse_fps(text: str) -> tuple[int, int]:
    """'30', '29.97' or '30000/1001' -> (numerator, denominator); StreamError otherwise."""
    try:
        if "/" in text:
            num, den = (int(part) for part in text.split("/"))
        else:
            value = float(text)
            if not (math.isfinite(value) and value > 0):
                raise ValueError
            num, den = frame_rate(value)
    except ValueError:
        raise StreamError(f"livelink fps must be a rate such as 30, 29.97 or 30000/1001, got {text!r}") from None
    if num <= 0 or den <= 0:
        raise StreamError(f"livelink fps must be positive, got {text!r}")
    return num, den


def _name(text: str, what: str) -> bytes:
    data = text.encode("utf-8")
    if not 0 < len(data) <= MAX_NAME_BYTES:
        raise StreamError(f"livelink {what} must be 1 to {MAX_NAME_BYTES} bytes of UTF-8, got {len(data)}")
    return struct.pack(">i", len(data)) + data


def livelink_packet(frame: StreamFrame, subject: str, device_id: str, fps_num: int, fps_den: int,
                    angle_scale: float = ANGLE_SCALES["radians"], swap_mouth_lr: bool = False) -> bytes:
    """One Live Link Face datagram (version 6) for a frame with a face.

    Head and eye angles go out with the app's signs (see the module docstring),
    times angle_scale (1/pi gives degrees / 180). A time that is not finite
    counts as 0; frame numbers wrap at 2**31 (int32). Raises ValueError for a
    frame without a face.
    """
    if not frame.face_found or frame.blendshapes is None:
        raise ValueError("a Live Link Face packet needs a frame with a face")
    frames = frame.time_s * fps_num / fps_den if math.isfinite(frame.time_s) else 0.0
    number = math.floor(frames + FRAME_TOLERANCE)  # 9.9999999 frames is frame 10, sub-frame 0
    subframe = min(max(frames - number, 0.0), MAX_SUBFRAME)
    number = (number + 2**31) % 2**32 - 2**31  # int32, however long the clock has run
    head = np.zeros(3) if frame.head_ypr_rad is None else frame.head_ypr_rad
    eyes = np.zeros((2, 3)) if frame.eyes_ypr_rad is None else np.reshape(frame.eyes_ypr_rad, (2, 3))
    blendshapes = swap_mouth_left_right(frame.blendshapes) if swap_mouth_lr else frame.blendshapes
    shapes = np.clip(np.nan_to_num(np.asarray(blendshapes, np.float64)[_PACKET_ORDER]), 0.0, 1.0)
    angles = np.nan_to_num(livelink_pose(head, eyes[0], eyes[1])) * angle_scale
    values = np.concatenate([shapes, angles]).astype(">f4")
    return b"".join([
        struct.pack(">B", PACKET_VERSION),
        _name(device_id, "device"),
        _name(subject, "subject"),
        struct.pack(">ifiiB", number, subframe, fps_num, fps_den, VALUE_COUNT),
        values.tobytes(),
    ])


class LiveLinkStream(UdpStream):
    """Frames to Unreal as Live Link Face packets; see the module docstring."""

    scheme = "livelink"
    default_port = 11111

    def __init__(self, host: str, port: int, subject: str = "capture", device: str | None = None,
                 fps: str | None = None, angles: str = "radians", swap_mouth_lr: str = "0"):
        device = device if device is not None else default_device_id()
        _name(subject, "subject")  # one-line StreamError before any socket opens
        _name(device, "device")
        if angles not in ANGLE_SCALES:
            raise StreamError(f"livelink angles must be one of {', '.join(ANGLE_SCALES)}, got {angles!r}")
        if swap_mouth_lr not in ("0", "1"):
            raise StreamError(f"livelink swap_mouth_lr must be 0 or 1, got {swap_mouth_lr!r}")
        self.subject, self.device_id = subject, device
        self.rate = parse_fps(fps) if fps is not None else None
        self.angle_scale = ANGLE_SCALES[angles]
        self.swap_mouth_lr = swap_mouth_lr == "1"
        super().__init__(host, port)

    def send(self, frame: StreamFrame) -> None:
        if not frame.face_found:
            return  # Unreal holds the last pose until the face returns
        num, den = self.rate or frame_rate(frame.fps)
        packet = livelink_packet(frame, self.subject, self.device_id, num, den, self.angle_scale,
                                 self.swap_mouth_lr)
        self.send_datagrams([packet], frame.captured_s)
