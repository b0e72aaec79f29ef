"""Tests for the vmc:// stream: real UDP bundles decoded by python-osc (an independent receiver)
and by a decoder written here from the OSC 1.0 specification."""
from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_bundle import OscBundle
from pythonosc.osc_server import BlockingOSCUDPServer

from capture.streams import StreamError, StreamFrame, open_stream
from capture.vmc import MAX_BUNDLE_BYTES, VmcStream, unity_head_quaternion, vmc_bundles
from engine.arkit import ARKIT_NAMES
from engine.pose import euler_yxz

PASCAL = [n[0].upper() + n[1:] for n in ARKIT_NAMES]
MIRROR_X = np.diag([-1.0, 1.0, 1.0])


def face_frame(index=0, time_s=1.25, blendshapes=None, rotation=None):
    if blendshapes is None:
        blendshapes = np.linspace(0.0, 1.0, 52) ** 2  # 52 distinct values, 0 and 1 included
    return StreamFrame(index=index, time_s=time_s, captured_s=time.perf_counter(), face_found=True,
                       blendshapes=np.asarray(blendshapes, dtype=np.float32),
                       head_rotation=np.eye(3) if rotation is None else rotation,
                       eyes_ypr_rad=np.zeros((2, 3)))


def lost_frame(index=1, time_s=2.5):
    return StreamFrame(index=index, time_s=time_s, captured_s=time.perf_counter(), face_found=False)


class Receiver:
    """python-osc's UDP server on an ephemeral port, recording (address, args) in arrival order."""

    def __init__(self):
        self.messages: list[tuple[str, list]] = []
        self._changed = threading.Condition()
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(self._record)
        self.server = BlockingOSCUDPServer(("127.0.0.1", 0), dispatcher)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01},
                                        daemon=True)
        self._thread.start()

    def _record(self, address, *args):
        with self._changed:
            self.messages.append((address, list(args)))
            self._changed.notify_all()

    def wait_for(self, address: str, count: int = 1, timeout_s: float = 2.0) -> list:
        """Block until `count` messages with this address arrived; all messages so far."""
        with self._changed:
            ok = self._changed.wait_for(lambda: sum(a == address for a, _ in self.messages) >= count, timeout_s)
            assert ok, f"timed out waiting for {address}; got {[a for a, _ in self.messages]}"
            return list(self.messages)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def quaternion_matrix(x, y, z, w):
    """Unit quaternion -> rotation matrix (the standard formula Unity also uses)."""
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def head_quaternion_via_udp(receiver, rotation):
    before = len(receiver.messages)
    frames_before = sum(a == "/VMC/Ext/T" for a, _ in receiver.messages)
    stream = VmcStream("127.0.0.1", receiver.port)
    try:
        stream.send(face_frame(rotation=rotation))
        messages = receiver.wait_for("/VMC/Ext/T", count=frames_before + 1)
    finally:
        stream.close()
    bones = [args for address, args in messages[before:] if address == "/VMC/Ext/Bone/Pos"]
    assert len(bones) == 1 and bones[0][0] == "Head"
    return np.array(bones[0][4:8])


# ------------------------------------------------------------ blend shapes and bundle layout


def osc_decode_bundle(data: bytes) -> list[tuple[str, list]]:
    """OSC 1.0: '#bundle\\0', an 8-byte time tag, then elements each prefixed by an int32 size;
    a message is a padded address, a padded type tag string and big-endian arguments."""
    assert data[:8] == b"#bundle\x00" and len(data) % 4 == 0
    at, messages = 16, []
    while at < len(data):
        (size,) = struct.unpack(">i", data[at:at + 4])
        element = data[at + 4:at + 4 + size]
        at += 4 + size

        def string(pos):
            end = element.index(b"\x00", pos)
            return element[pos:end].decode(), (end // 4 + 1) * 4

        address, pos = string(0)
        tags, pos = string(pos)
        args = []
        for tag in tags[1:]:
            if tag == "s":
                text, pos = string(pos)
                args.append(text)
            elif tag in "if":
                args.append(struct.unpack(">" + tag, element[pos:pos + 4])[0])
                pos += 4
        assert pos == size, address
        messages.append((address, args))
    assert at == len(data)
    return messages


@pytest.mark.parametrize("names, expected_names", [("camel", list(ARKIT_NAMES)), ("arkit", list(ARKIT_NAMES)),
                                                   ("pascal", PASCAL), (None, PASCAL)])
def test_blendshapes_arrive_exactly(receiver, names, expected_names):
    frame = face_frame()
    query = f"?names={names}" if names else ""
    stream = open_stream(f"vmc://127.0.0.1:{receiver.port}{query}")
    try:
        stream.send(frame)
        messages = receiver.wait_for("/VMC/Ext/T")
    finally:
        stream.close()
    vals = [args for address, args in messages if address == "/VMC/Ext/Blend/Val"]
    assert [name for name, _ in vals] == expected_names
    assert [value for _, value in vals] == [float(np.float32(v)) for v in frame.blendshapes]
    assert all(len(args) == 2 for args in vals)
    addresses = [a for a, _ in messages]
    # Apply comes after every Val, then the head, then OK and T
    assert addresses == ["/VMC/Ext/Blend/Val"] * 52 + ["/VMC/Ext/Blend/Apply", "/VMC/Ext/Bone/Pos",
                                                      "/VMC/Ext/OK", "/VMC/Ext/T"]
    assert dict(messages)["/VMC/Ext/OK"] == [1, 3, 0, 1]
    assert dict(messages)["/VMC/Ext/T"] == [float(np.float32(1.25))]
    assert stream.sent == 1 and stream.dropped == 0 and len(stream.latency_s) == 1


def test_frames_fit_bundles_of_1500_bytes(udp_socket):
    """The VMC specification: bundles of at most 1,500 bytes. A face frame is split; Apply, the head,
    OK and T travel together in its last bundle, every value before them."""
    stream = VmcStream("127.0.0.1", udp_socket.getsockname()[1])
    try:
        stream.send(face_frame())
        stream.send(lost_frame())
        datagrams = [udp_socket.recvfrom(65536)[0] for _ in range(3)]  # 2 for the face, 1 for the lost frame
        udp_socket.settimeout(0.2)
        with pytest.raises(TimeoutError):
            udp_socket.recvfrom(65536)
    finally:
        stream.close()
    assert all(len(d) <= MAX_BUNDLE_BYTES <= 1500 for d in datagrams), [len(d) for d in datagrams]
    assert all(OscBundle.dgram_is_bundle(d) for d in datagrams)
    bundles = [osc_decode_bundle(d) for d in datagrams]
    face, lost = bundles[:-1], bundles[-1]
    assert len(face) == 2  # 2.7 KB of messages
    assert [a for a, _ in face[-1] if a != "/VMC/Ext/Blend/Val"] == ["/VMC/Ext/Blend/Apply", "/VMC/Ext/Bone/Pos",
                                                                    "/VMC/Ext/OK", "/VMC/Ext/T"]
    messages = [m for bundle in face for m in bundle]
    assert [a for a, _ in messages] == ["/VMC/Ext/Blend/Val"] * 52 + ["/VMC/Ext/Blend/Apply", "/VMC/Ext/Bone/Pos",
                                                                      "/VMC/Ext/OK", "/VMC/Ext/T"]
    assert [args[0] for _, args in messages[:52]] == PASCAL
    np.testing.assert_array_equal([args[1] for _, args in messages[:52]], face_frame().blendshapes)
    assert [a for a, _ in lost] == ["/VMC/Ext/OK", "/VMC/Ext/T"]
    assert stream.sent == 2 and stream.dropped == 0


def test_long_names_still_fit():
    """However long the shape names (a bundle split at each message boundary), no bundle is over."""
    names = [f"Prefix/{n}/WithAVeryLongSuffixIndeed" for n in PASCAL]
    bundles = vmc_bundles(face_frame(), names)
    assert all(len(b) <= MAX_BUNDLE_BYTES for b in bundles) and len(bundles) >= 3
    messages = [m for b in bundles for m in osc_decode_bundle(b)]
    assert [args[0] for a, args in messages if a == "/VMC/Ext/Blend/Val"] == names
    assert [a for a, _ in osc_decode_bundle(bundles[-1])][-4:] == ["/VMC/Ext/Blend/Apply", "/VMC/Ext/Bone/Pos",
                                                                   "/VMC/Ext/OK", "/VMC/Ext/T"]


def test_values_are_clipped_and_nan_free():
    shapes = np.full(52, 0.5)
    shapes[0], shapes[1], shapes[2] = 1.5, -0.25, np.nan
    messages = [m for b in vmc_bundles(face_frame(blendshapes=shapes)) for m in osc_decode_bundle(b)]
    values = [args[1] for _, args in messages[:52]]
    assert values[:3] == [1.0, 0.0, 0.0] and values[3:] == [0.5] * 49


def test_face_lost_holds_pose(receiver):
    stream = VmcStream("127.0.0.1", receiver.port)
    try:
        stream.send(lost_frame(time_s=2.5))
        messages = receiver.wait_for("/VMC/Ext/T")
    finally:
        stream.close()
    assert messages == [("/VMC/Ext/OK", [1, 3, 0, 0]), ("/VMC/Ext/T", [2.5])]


def test_face_found_without_blendshapes_counts_as_lost():
    frame = face_frame()
    frame.blendshapes = None
    (bundle,) = vmc_bundles(frame)
    messages = osc_decode_bundle(bundle)
    assert [a for a, _ in messages] == ["/VMC/Ext/OK", "/VMC/Ext/T"]
    assert messages[0][1][3] == 0


# ------------------------------------------------------------ head rotation


@pytest.mark.parametrize("yaw_deg, pitch_deg, roll_deg", [
    (0, 0, 0), (30, 0, 0), (-30, 0, 0), (0, 20, 0), (0, 0, 15),
    (25, -10, 5), (-60, 35, -20), (170, 5, 0), (90, 80, 45),
])
def test_quaternion_decodes_back_to_rotation(receiver, yaw_deg, pitch_deg, roll_deg):
    R_head = euler_yxz(*np.radians([yaw_deg, pitch_deg, roll_deg]))
    q = head_quaternion_via_udp(receiver, R_head)
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-6)
    assert q[3] >= 0
    R_unity = quaternion_matrix(*q)
    # undo the x mirror: back in ARKit's face frame it is the rotation we sent
    np.testing.assert_allclose(MIRROR_X @ R_unity @ MIRROR_X, R_head, atol=2e-6)


def test_turn_toward_subjects_left_is_negative_unity_yaw(receiver):
    q = head_quaternion_via_udp(receiver, euler_yxz(np.radians(30), 0.0, 0.0))
    forward = quaternion_matrix(*q) @ [0.0, 0.0, 1.0]
    # the avatar faces its own left: Unity -x, a negative rotation about +y
    assert forward[0] == pytest.approx(-np.sin(np.radians(30)), abs=1e-6)
    assert q[1] == pytest.approx(-np.sin(np.radians(15)), abs=1e-6) and q[0] == q[2] == 0.0


def test_chin_down_and_roll_to_right_shoulder(receiver):
    q = head_quaternion_via_udp(receiver, euler_yxz(0.0, np.radians(20), 0.0))
    assert (quaternion_matrix(*q) @ [0.0, 0.0, 1.0])[1] < -0.3  # looks down
    assert q[0] > 0  # Unity: positive rotation about +x pitches the face down
    q = head_quaternion_via_udp(receiver, euler_yxz(0.0, 0.0, np.radians(20)))
    assert (quaternion_matrix(*q) @ [0.0, 1.0, 0.0])[0] > 0.3  # crown toward the avatar's right (+x)


def test_quaternion_near_half_turn():
    for axis in np.eye(3):
        angle = np.pi - 1e-9
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        R = np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K
        q = unity_head_quaternion(R)
        np.testing.assert_allclose(MIRROR_X @ quaternion_matrix(*q) @ MIRROR_X, R, atol=1e-7)


def test_head_position_default_and_option(receiver):
    stream = VmcStream("127.0.0.1", receiver.port)
    other = open_stream(f"vmc://127.0.0.1:{receiver.port}?head_pos=0.01,0.1,-0.02")
    try:
        stream.send(face_frame())
        receiver.wait_for("/VMC/Ext/T", 1)
        other.send(face_frame())
        messages = receiver.wait_for("/VMC/Ext/T", 2)
    finally:
        stream.close()
        other.close()
    bones = [args for address, args in messages if address == "/VMC/Ext/Bone/Pos"]
    assert bones[0][1:4] == [0.0, float(np.float32(0.08)), 0.0]
    assert bones[1][1:4] == [float(np.float32(v)) for v in (0.01, 0.1, -0.02)]


# ------------------------------------------------------------ URLs, options, robustness


def test_open_stream_defaults():
    stream = open_stream("vmc://")
    try:
        assert isinstance(stream, VmcStream)
        assert (stream.host, stream.port) == ("127.0.0.1", 39539)
        assert list(stream.names) == PASCAL  # the specification's case-sensitive Perfect Sync names
    finally:
        stream.close()


@pytest.mark.parametrize("query, words", [
    ("names=snake", "names"), ("colour=red", "unknown"), ("head_pos=1,2", "head_pos"),
    ("head_pos=a,b,c", "head_pos"), ("head_pos=0,nan,0", "head_pos"),
])
def test_bad_options_raise_one_line(query, words):
    with pytest.raises(StreamError) as info:
        open_stream(f"vmc://127.0.0.1:39539?{query}")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_no_receiver_never_blocks_or_raises(silent_udp_port):
    port = silent_udp_port
    stream = VmcStream("127.0.0.1", port)
    start = time.perf_counter()
    try:
        for i in range(100):
            stream.send(face_frame(index=i) if i % 10 else lost_frame(index=i))
    finally:
        stream.close()
    assert time.perf_counter() - start < 1.0
    assert stream.sent == 100
