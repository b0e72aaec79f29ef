"""Fixtures shared by the test modules."""
import pytest

from engine.facemodel import FaceModel


@pytest.fixture(scope="session")
def model() -> FaceModel:
    """The face model from ../shared (or $CAPTURE_FACE_MODEL), loaded once."""
    return FaceModel.load()


def _tracked_frames(video, n_frames: int):
    """The first n_frames of a video (RGB) and MediaPipe's 478 landmarks on each (tracking mode, px);
    every frame must have a face."""
    import cv2

    from engine.landmarks import MediaPipeLandmarker

    cap = cv2.VideoCapture(str(video))
    frames = [cv2.cvtColor(cap.read()[1], cv2.COLOR_BGR2RGB) for _ in range(n_frames)]
    cap.release()
    with MediaPipeLandmarker(static=False) as mesh:
        landmarks = [mesh.detect(f) for f in frames]
    assert all(lm is not None for lm in landmarks)
    return frames, landmarks


@pytest.fixture(scope="session")
def tracked_frames():
    """tracked_frames(video, n_frames) -> (frames RGB, MediaPipe landmarks (478, 3) px on each)."""
    return _tracked_frames


@pytest.fixture
def udp_socket():
    """A UDP socket bound to a free loopback port: a raw receiver of whole datagrams."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


@pytest.fixture
def silent_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound once, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _randomised_net(seed: int = 0, config=None):
    """A CoarseNet whose outputs vary O(1) with the input: BatchNorm statistics from random
    batches, random affine BN parameters, and a head scaled to unit output spread (the
    untrained head is nearly constant, which would make agreement tests trivial)."""
    import math

    import torch
    from torch import nn

    from engine.coarsenet import CoarseNet, CoarseNetConfig

    torch.manual_seed(seed)
    net = CoarseNet(config or CoarseNetConfig())
    size = net.config.input_size
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        L = net.config.n_landmarks

        def landmarks():  # normalised crop coordinates, as engine.coarsenet.normalise_landmarks gives
            return torch.rand(4, L, 2) * 1.6 - 0.8 if L else None

        net.train()
        for _ in range(2):
            net(torch.rand(4, 3, size, size) * 2 - 1, landmarks())
        net.eval()
        feats = net.embed(torch.rand(4, 3, size, size) * 2 - 1, landmarks())
        spread = float(feats.std(0).mean())
        net.head.weight.normal_(0.0, 1.0 / (spread * math.sqrt(feats.shape[1])))
    return net


@pytest.fixture(scope="session")
def randomised_net():
    """randomised_net(seed, config=None) -> CoarseNet with input-dependent outputs."""
    return _randomised_net


def _tkhd_matrix_offset(data: bytes) -> int:
    """Byte offset of the (first) video track header's 3x3 display matrix in an MP4."""
    import struct

    from capture.sources import _mp4_boxes

    def find(path, start, end):
        for kind, payload, box_end in _mp4_boxes(data, start, end):
            if kind == path[0]:
                return payload if len(path) == 1 else find(path[1:], payload, box_end)
        raise ValueError(f"no {path[0]!r} box")

    tkhd = find([b"moov", b"trak", b"tkhd"], 0, len(data))
    version = struct.unpack(">B", data[tkhd:tkhd + 1])[0]
    return tkhd + (52 if version == 1 else 40)  # after version/flags, times, ids, duration, layer, volume


def _write_rotated_mp4(upright_bgr: list, path, fps: float, degrees: int = 90):
    """An MP4 as a phone films portrait video: each picture stored turned `degrees` counter-clockwise,
    and the track header's display matrix saying "turn it `degrees` clockwise to show it" (as
    ffmpeg's `-display_rotation` or an iPhone writes it; OpenCV reads it as CAP_PROP_ORIENTATION_META).
    degrees 0 writes the same pictures upright with the identity matrix."""
    import math
    import struct

    import cv2

    turn = {0: None, 90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}[degrees]
    stored = [img if turn is None else cv2.rotate(img, turn) for img in upright_bgr]
    h, w = stored[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        pytest.skip("cv2 cannot write mp4v here")
    for img in stored:
        writer.write(img)
    writer.release()
    data = bytearray(open(path, "rb").read())
    at = _tkhd_matrix_offset(bytes(data))
    assert struct.unpack(">9i", data[at:at + 36]) == (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
    c, s = round(math.cos(math.radians(degrees))), round(math.sin(math.radians(degrees)))
    shift = {0: (0, 0), 90: (h, 0), 180: (w, h), 270: (0, w)}[degrees]  # keeps the turned picture at x, y >= 0
    data[at:at + 36] = struct.pack(">9i", c << 16, s << 16, 0, -s << 16, c << 16, 0,
                                   shift[0] << 16, shift[1] << 16, 1 << 30)
    open(path, "wb").write(data)
    return path


@pytest.fixture(scope="session")
def rotated_mp4():
    """rotated_mp4(upright BGR pictures, path, fps, degrees=90) -> path of a phone-style rotated MP4."""
    return _write_rotated_mp4


#: Where and how much of d12.mp4 the corrupt copy overwrites: 177 of its 183 frames still decode.
CORRUPT_AT_FRACTION, CORRUPT_BYTES = 0.35, 16384


@pytest.fixture(scope="session")
def corrupt_d12(tmp_path_factory):
    """A copy of ../shared's d12.mp4 with 16 KiB of random bytes written over its middle; skips without it.

    Checked with OpenCV alone, so that the tests mean something: reading frame after frame stops
    at the damage, well before the end, yet frames after it still decode (grab past the failure)."""
    from pathlib import Path

    import cv2
    import numpy as np

    d12 = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "d12.mp4"
    if not d12.is_file():
        pytest.skip("shared video missing")
    data = bytearray(d12.read_bytes())
    at = int(len(data) * CORRUPT_AT_FRACTION)
    data[at:at + CORRUPT_BYTES] = np.random.default_rng(0).integers(0, 256, CORRUPT_BYTES, np.uint8).tobytes()
    path = tmp_path_factory.mktemp("corrupt") / "d12_corrupt.mp4"
    path.write_bytes(bytes(data))

    cap = cv2.VideoCapture(str(path))
    read_in_a_row = 0
    while cap.read()[0]:
        read_in_a_row += 1
    cap.release()
    cap = cv2.VideoCapture(str(path))
    grabbed = sum(bool(cap.grab()) for _ in range(200))
    cap.release()
    assert 20 < read_in_a_row < 120, read_in_a_row  # OpenCV's read() gives up at the damage
    assert grabbed > read_in_a_row + 50, grabbed    # but most frames after it still decode
    return path
