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
