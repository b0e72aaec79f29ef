"""livelink://: real datagrams on loopback, read back by a decoder written here.

The decoder and the name table below are typed out from Unreal's sources
(ARTrackable.h's EARFaceBlendShape, AppleARKitLiveLinkSource.cpp's packet
version 6), not taken from capture.livelink, so a mistake in the sender's
layout or order shows up as a failure rather than agreeing with itself.
"""
import math
import struct
import time

import numpy as np
import pytest

from capture.livelink import LiveLinkStream, livelink_packet
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
    # head and eyes as degrees / 180, Unreal's ARKit convention
    assert v["HeadYaw"] == pytest.approx(0.3 / math.pi) and v["HeadPitch"] == pytest.approx(-0.2 / math.pi)
    assert v["HeadRoll"] == pytest.approx(0.1 / math.pi)
    assert v["LeftEyeYaw"] == pytest.approx(0.10 / math.pi) and v["LeftEyePitch"] == pytest.approx(0.05 / math.pi)
    assert v["RightEyeYaw"] == pytest.approx(0.12 / math.pi) and v["RightEyePitch"] == pytest.approx(-0.04 / math.pi)
    assert v["RightEyeRoll"] == pytest.approx(0.01 / math.pi)
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
    assert got["subject"] == "capture" and got["device"].startswith("capture-")


def test_radians_option_and_the_frames_own_ntsc_rate(receiver):
    stream = LiveLinkStream("127.0.0.1", receiver.getsockname()[1], angles="radians")
    try:
        stream.send(face_frame(10.0, fps=29.97))
        got = receive(receiver)
    finally:
        stream.close()
    assert got["rate"] == (30000, 1001)
    assert got["frame_number"] == math.floor(10.0 * 30000 / 1001)  # 299.7 -> 299
    assert got["subframe"] == pytest.approx(10.0 * 30000 / 1001 - 299, abs=1e-4)
    assert got["values"]["HeadYaw"] == pytest.approx(0.3) and got["values"]["LeftEyeYaw"] == pytest.approx(0.10)


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
    ("subject=", "livelink subject"),
    ("colour=red", "bad option"),
])
def test_bad_options_are_one_line_errors(query, words):
    with pytest.raises(StreamError) as err:
        open_stream(f"livelink://127.0.0.1:9?{query}")
    assert words in str(err.value) and "\n" not in str(err.value)
