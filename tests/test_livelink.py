"""livelink://: real datagrams on loopback, read back by a decoder written here.

The decoder and the name table below are typed out from Unreal's sources
(ARTrackable.h's EARFaceBlendShape, AppleARKitLiveLinkSource.cpp's packet
version 6), not taken from capture.livelink, so a mistake in the sender's
layout or order shows up as a failure rather than agreeing with itself.
"""
import math
import struct
import time
import uuid

import numpy as np
import pytest

from capture.livelink import LiveLinkStream, default_device_id, livelink_packet
from capture.streams import StreamError, StreamFrame, open_stream
from engine.arkit import ARKIT_NAMES, LIVELINK_CSV_NAMES, LIVELINK_UDP_NAMES

#: EARFaceBlendShape, in enum order, all 61 values of a packet.
UNREAL_ORDER = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft", "EyeSquintLeft", "EyeWideLeft",
    "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight", "EyeLookUpRight", "EyeSquintRight", "EyeWideRight",
    "JawForward", "JawLeft", "JawRight", "JawOpen",
    "MouthClose", "MouthFunnel", "MouthPucker", "MouthLeft", "MouthRight", "MouthSmileLeft", "MouthSmileRight",
    "MouthFrownLeft", "MouthFrownRight", "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
    "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper", "MouthPressLeft", "MouthPressRight",
    "MouthLowerDownLeft", "MouthLowerDownRight", "MouthUpperUpLeft", "MouthUpperUpRight",
    "BrowDownLeft", "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight",
    "CheekPuff", "CheekSquintLeft", "CheekSquintRight", "NoseSneerLeft", "NoseSneerRight", "TongueOut",
    "HeadYaw", "HeadPitch", "HeadRoll",
    "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll", "RightEyeYaw", "RightEyePitch", "RightEyeRoll",
)


def decode(packet: bytes) -> dict:
    """Unreal's reading of a version-6 packet: big-endian, int32-length-prefixed UTF-8 names."""
    at = 0

    def take(fmt):
        nonlocal at
        values = struct.unpack_from(fmt, packet, at)
        at += struct.calcsize(fmt)
        return values

    def name():
        nonlocal at
        (length,) = take(">i")
        text = packet[at:at + length].decode("utf-8")
        at += length
        return text

    (version,) = take(">B")
    device, subject = name(), name()
    frame_number, subframe, num, den, count = take(">ifiiB")
    values = take(f">{count}f")
    assert at == len(packet), "bytes left over after the last value"
    return {"version": version, "device": device, "subject": subject, "frame_number": frame_number,
            "subframe": subframe, "rate": (num, den), "count": count,
            "values": dict(zip(UNREAL_ORDER, values, strict=True))}


def face_frame(time_s=2.5, fps=30.0, **shapes) -> StreamFrame:
    blendshapes = np.zeros(52)
    for name, value in shapes.items():
        blendshapes[ARKIT_NAMES.index(name)] = value
    return StreamFrame(7, time_s, time.perf_counter(), True, fps, blendshapes=blendshapes,
                       head_ypr_rad=np.array([0.3, -0.2, 0.1]),
                       eyes_ypr_rad=np.array([[0.10, 0.05, 0.0], [0.12, -0.04, 0.01]]))


@pytest.fixture
def receiver(udp_socket):
    return udp_socket


def receive(sock) -> dict:
    return decode(sock.recvfrom(4096)[0])


def test_udp_names_are_unreals_enum_order_and_the_arkit_set():
    assert LIVELINK_UDP_NAMES == UNREAL_ORDER[:52]
    assert {n[0].upper() + n[1:] for n in ARKIT_NAMES} == set(LIVELINK_UDP_NAMES)
    for i, name in enumerate(ARKIT_NAMES):  # name by name: eyeBlinkLeft <-> EyeBlinkLeft
        assert LIVELINK_UDP_NAMES[i] == name[0].upper() + name[1:], name
    differ = [(u, c) for u, c in zip(LIVELINK_UDP_NAMES, LIVELINK_CSV_NAMES) if u != c]
    assert differ == [("JawLeft", "JawRight"), ("JawRight", "JawLeft"),
                      ("MouthLeft", "MouthRight"), ("MouthRight", "MouthLeft")]


def test_packet_over_udp_decodes_name_by_name(receiver):
    port = receiver.getsockname()[1]
    stream = open_stream(f"livelink://127.0.0.1:{port}?subject=Face01&device=rig-7&fps=60")
    try:
        # 2.5 s + half a frame at 60 frames/s: frame 150, sub-frame 0.5
        stream.send(face_frame(2.5 + 0.5 / 60, jawOpen=0.7, eyeBlinkLeft=0.25, mouthLeft=0.4, jawRight=0.15))
        got = receive(receiver)
    finally:
        stream.close()
    assert (got["version"], got["device"], got["subject"]) == (6, "rig-7", "Face01")
    assert (got["frame_number"], got["rate"], got["count"]) == (150, (60, 1), 61)
    assert got["subframe"] == pytest.approx(0.5, abs=1e-4)
    v = got["values"]
    assert v["JawOpen"] == pytest.approx(0.7) and v["EyeBlinkLeft"] == pytest.approx(0.25)
    assert v["MouthLeft"] == pytest.approx(0.4) and v["MouthRight"] == 0.0
    assert v["JawRight"] == pytest.approx(0.15) and v["JawLeft"] == 0.0
    assert sum(v[n] for n in UNREAL_ORDER[:52]) == pytest.approx(0.7 + 0.25 + 0.4 + 0.15)
    # head and eyes in radians as the app streams them, yaw and roll with the app's signs
    # (the frame's engine/pose.py angles: yaw 0.3 is toward the subject's left, the app's -0.3)
    assert v["HeadYaw"] == pytest.approx(-0.3) and v["HeadPitch"] == pytest.approx(-0.2)
    assert v["HeadRoll"] == pytest.approx(-0.1)
    assert v["LeftEyeYaw"] == pytest.approx(-0.10) and v["LeftEyePitch"] == pytest.approx(0.05)
    assert v["RightEyeYaw"] == pytest.approx(-0.12) and v["RightEyePitch"] == pytest.approx(-0.04)
    assert v["RightEyeRoll"] == pytest.approx(-0.01)
    assert stream.sent == 1 and len(stream.latency_s) == 1


def test_face_lost_sends_nothing_and_the_face_resumes(receiver):
    stream = LiveLinkStream("127.0.0.1", receiver.getsockname()[1])
    try:
        stream.send(StreamFrame(0, 0.0, time.perf_counter(), False))
        receiver.settimeout(0.3)
        with pytest.raises(TimeoutError):
            receiver.recvfrom(4096)
        receiver.settimeout(2.0)
        stream.send(face_frame(1.0, jawOpen=0.5))
        got = receive(receiver)
    finally:
        stream.close()
    assert got["values"]["JawOpen"] == pytest.approx(0.5) and stream.sent == 1
    assert got["subject"] == "capture"


def test_halfturns_option_and_the_frames_own_ntsc_rate(receiver):
    stream = LiveLinkStream("127.0.0.1", receiver.getsockname()[1], angles="halfturns")
    try:
        stream.send(face_frame(10.0, fps=29.97))
        got = receive(receiver)
    finally:
        stream.close()
    assert got["rate"] == (30000, 1001)
    assert got["frame_number"] == math.floor(10.0 * 30000 / 1001)  # 299.7 -> 299
    assert got["subframe"] == pytest.approx(10.0 * 30000 / 1001 - 299, abs=1e-4)
    assert got["values"]["HeadYaw"] == pytest.approx(-0.3 / math.pi)  # degrees / 180
    assert got["values"]["LeftEyeYaw"] == pytest.approx(-0.10 / math.pi)


def test_head_turned_and_tilted_to_the_subjects_right_and_left(receiver):
    """Live Link Face: HeadYaw > 0 when the face turns toward the subject's right, HeadRoll > 0 when
    the head tilts toward the left shoulder. The rotations are built from where the face points
    (ARKit face frame: +x the subject's left, +y up, +z out of the face), not from our angles."""
    from engine.pose import yaw_pitch_roll

    def rotation(axis, angle):
        c, s = math.cos(angle), math.sin(angle)
        if axis == "y":
            return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])

    turned_right = rotation("y", -0.4)  # the face normal swings toward -x, the subject's right
    assert (turned_right @ [0, 0, 1])[0] < 0
    tilted_left = rotation("z", -0.25)  # the crown swings toward +x, the subject's left shoulder
    assert (tilted_left @ [0, 1, 0])[0] > 0
    stream = LiveLinkStream("127.0.0.1", receiver.getsockname()[1])
    try:
        got = []
        for R in (turned_right, tilted_left):
            frame = face_frame()
            frame.head_ypr_rad = yaw_pitch_roll(R)
            stream.send(frame)
            got.append(receive(receiver)["values"])
    finally:
        stream.close()
    assert got[0]["HeadYaw"] == pytest.approx(0.4, abs=1e-6) and got[0]["HeadRoll"] == pytest.approx(0, abs=1e-6)
    assert got[1]["HeadRoll"] == pytest.approx(0.25, abs=1e-6) and got[1]["HeadYaw"] == pytest.approx(0, abs=1e-6)


def test_eye_yaw_follows_live_link_face_takes(receiver):
    """As in real app exports, each eye's yaw rises with its rightward look shapes
    (EyeLookInLeft - EyeLookOutLeft, EyeLookOutRight - EyeLookInRight), about 0.6 rad per unit."""
    from engine.arkit import arkit_name_of_model_shape
    from engine.gaze import eye_look_weights

    stream = LiveLinkStream("127.0.0.1", receiver.getsockname()[1])
    looks, yaws = [], []
    try:
        for yaw in (-0.4, -0.2, 0.1, 0.3):  # engine/pose.py's signs, both eyes alike
            angles = np.array([[yaw, 0.1], [yaw, 0.1]])
            shapes = {arkit_name_of_model_shape(n): v for n, v in eye_look_weights(angles).items()}
            frame = face_frame(**shapes)
            frame.eyes_ypr_rad = np.array([[yaw, 0.1, 0.0], [yaw, 0.1, 0.0]])
            stream.send(frame)
            v = receive(receiver)["values"]
            looks.append([v["EyeLookInLeft"] - v["EyeLookOutLeft"], v["EyeLookOutRight"] - v["EyeLookInRight"]])
            yaws.append([v["LeftEyeYaw"], v["RightEyeYaw"]])
    finally:
        stream.close()
    looks, yaws = np.array(looks), np.array(yaws)
    ratio = yaws / looks
    assert ((ratio > 0.4) & (ratio < 0.8)).all(), ratio


def pylivelinkface_decode(packet: bytes) -> dict:
    """How PyLiveLinkFace's decoder reads a packet: fixed offsets that assume a 36-character
    device id (bytes 4..41 are the id's length byte, 36 = '$', and the id), then the name."""
    (version,) = struct.unpack("<i", packet[0:4])
    device = packet[4:41].decode("utf-8")
    (name_length,) = struct.unpack("!i", packet[41:45])
    name = packet[45:45 + name_length].decode("utf-8")
    at = 45 + name_length
    frame_number, subframe, fps, denominator, count = struct.unpack("!if2ib", packet[at:at + 17])
    values = struct.unpack("!61f", packet[at + 17:])
    return {"version": version, "device": device, "name": name, "count": count, "values": values}


def test_default_device_id_is_a_stable_uuid_python_receivers_read(receiver):
    stream = LiveLinkStream("127.0.0.1", receiver.getsockname()[1], subject="Face")
    try:
        stream.send(face_frame(jawOpen=0.5))
        packet = receiver.recvfrom(4096)[0]
    finally:
        stream.close()
    device = decode(packet)["device"]
    assert len(device) == 36 and str(uuid.UUID(device)).upper() == device
    assert device == default_device_id() == LiveLinkStream("127.0.0.1", 9).device_id  # stable per machine
    assert default_device_id("another-host") != device
    got = pylivelinkface_decode(packet)
    assert (got["version"], got["device"], got["name"], got["count"]) == (6, "$" + device, "Face", 61)
    assert got["values"][UNREAL_ORDER.index("JawOpen")] == pytest.approx(0.5)


def test_swap_mouth_lr_option(receiver):
    stream = open_stream(f"livelink://127.0.0.1:{receiver.getsockname()[1]}?swap_mouth_lr=1")
    try:
        stream.send(face_frame(mouthLeft=0.6, jawLeft=0.3))
        v = receive(receiver)["values"]
    finally:
        stream.close()
    assert (v["MouthLeft"], v["MouthRight"]) == (0.0, pytest.approx(0.6))
    assert v["JawLeft"] == pytest.approx(0.3)  # only the mouth pair


def test_float_noise_never_skips_a_frame_number():
    time_s = sum([0.04] * 10)  # 0.39999999999999997: frame 10 at 25 frames/s, not 9
    got = decode(livelink_packet(face_frame(time_s), "s", "d", 25, 1))
    assert got["frame_number"] == 10 and got["subframe"] == 0.0


@pytest.mark.parametrize("time_s", [1e9, float("nan"), float("inf")])
def test_any_clock_makes_a_packet(time_s):
    got = decode(livelink_packet(face_frame(time_s), "s", "d", 30, 1))
    assert -2**31 <= got["frame_number"] < 2**31 and 0 <= got["subframe"] < 1


def test_packet_size_and_unicode_names():
    packet = livelink_packet(face_frame(), "Gesicht-ü", "dev", 30, 1)
    assert len(packet) == 1 + 4 + 3 + 4 + len("Gesicht-ü".encode()) + 16 + 1 + 61 * 4
    assert decode(packet)["subject"] == "Gesicht-ü"
    with pytest.raises(ValueError):
        livelink_packet(StreamFrame(0, 0.0, 0.0, False), "s", "d", 30, 1)


@pytest.mark.parametrize("query, words", [
    ("fps=fast", "livelink fps"),
    ("fps=0", "livelink fps"),
    ("angles=degrees", "livelink angles"),
    ("swap_mouth_lr=yes", "swap_mouth_lr"),
    ("subject=", "livelink subject"),
    ("colour=red", "bad option"),
])
def test_bad_options_are_one_line_errors(query, words):
    with pytest.raises(StreamError) as err:
        open_stream(f"livelink://127.0.0.1:9?{query}")
    assert words in str(err.value) and "\n" not in str(err.value)
